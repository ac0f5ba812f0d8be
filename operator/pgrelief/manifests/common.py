"""What every object pgrelief builds shares: its name, labels, owner and content hash.

All PgBouncer objects of one policy share one name (a valid Service name whatever the
policy's), the recommended ``app.kubernetes.io`` labels (the selector uses the two that never
change), a controller ownerReference to the policy so Kubernetes' garbage collector deletes
them with it, and a ``pgrelief.dev/spec-hash`` annotation: the digest of everything pgrelief
set on the object, which the controller compares with the live object's to decide whether it
must be patched.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pgrelief.policy import API_VERSION_FULL, KIND

Manifest = dict[str, Any]

SPEC_HASH = "pgrelief.dev/spec-hash"
MANAGED_BY = "app.kubernetes.io/managed-by"
POLICY_ANNOTATION = "pgrelief.dev/policy"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Owner:
    """The ConnectionPolicy the objects belong to (metadata.name, .namespace, .uid)."""

    name: str
    namespace: str
    uid: str


def object_name(policy_name: str) -> str:
    """The name of all four objects: ``<policy>-pgbouncer`` when that is a valid Service name
    (a DNS-1035 label), else a shortened, hashed one that is."""
    simple = f"{policy_name}-pgbouncer"
    if len(simple) <= 63 and _DNS1035.match(simple):
        return simple
    digest = hashlib.sha256(policy_name.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", policy_name.lower()).strip("-")[:43].strip("-")
    return f"pgbouncer-{stem}-{digest}" if stem else f"pgbouncer-{digest}"


def selector_labels(owner: Owner) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pgbouncer",
        "app.kubernetes.io/instance": object_name(owner.name),
    }


def labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/component": "connection-pooler",
        MANAGED_BY: "pgrelief",
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION_FULL,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_hash(manifest: Manifest) -> str:
    """A digest of everything pgrelief sets on ``manifest`` except this annotation itself."""
    body = json.loads(json.dumps(manifest))
    body.get("metadata", {}).get("annotations", {}).pop(SPEC_HASH, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def metadata(owner: Owner, **extra: Any) -> dict[str, Any]:
    return {
        "name": object_name(owner.name),
        "namespace": owner.namespace,
        "labels": labels(owner),
        "annotations": {POLICY_ANNOTATION: owner.name},
        "ownerReferences": [owner_reference(owner)],
        **extra,
    }


def hashed(manifest: Manifest) -> Manifest:
    manifest["metadata"]["annotations"][SPEC_HASH] = spec_hash(manifest)
    return manifest
