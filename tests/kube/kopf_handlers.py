"""A trivial kopf operator run by test_testenv.py against the test API server.

On creation of a Gadget it annotates the object and writes a greeting into its status.
"""

from __future__ import annotations

from typing import Any

import kopf

GROUP = "kopf.testenv.pgrelief.io"
ANNOTATION = f"{GROUP}/handled-by"


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The kubernetes client reads $KUBECONFIG once, at import; kopf's own reader reads it now.
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = True
    settings.watching.server_timeout = 10


@kopf.on.create(GROUP, "v1", "gadgets")
def greet(spec: kopf.Spec, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> dict[str, str]:
    patch.metadata.annotations[ANNOTATION] = "kopf"
    logger.info("greeting %s", spec.get("name"))
    return {"greeting": f"hello {spec.get('name')}"}
