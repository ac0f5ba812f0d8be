"""Helpers shared by the tests against the test API server: waiting, and throwaway CRDs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tests.fixtures.kube import KubeApiServer

T = TypeVar("T")


def eventually(fn: Callable[[], T | None], timeout: float = 20, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def crd_manifest(group: str, plural: str, kind: str, *, structural: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
            },
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    if not structural:
        # A property without a type is not a structural schema: apiextensions/v1 rejects it.
        schema["properties"]["spec"]["properties"]["size"] = {"description": "untyped"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def apply_crd(kube: KubeApiServer, manifest: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    kube.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        f"crd/{manifest['metadata']['name']}",
    )
