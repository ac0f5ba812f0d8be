"""Keeps one policy's PgBouncer (ConfigMap, Service, PodDisruptionBudget, Deployment) as wanted.

Like CloudNativePG's pooler reconcile: build the desired objects (``manifests.pgbouncer``, sized
from the latest snapshot's connection budget), compare, and server-side apply only what
differs. What differs is known without polling: the last applied content is remembered, and
kopf's watch on the objects pgrelief manages tells the worker what the cluster has (a
ConfigMap edited by hand, a Deployment deleted, replicas becoming available), so a quiet
policy costs no API calls. An oversubscribed spec, or an auth_query whose lookup function is
missing, applies nothing and says why in ``PgBouncerReady`` and one Warning Event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgrelief.controller.kube import Kube, KubeError
from pgrelief.manifests.common import SPEC_HASH, Manifest, Owner, object_name
from pgrelief.manifests.events import EventNote
from pgrelief.manifests.pgbouncer import (
    NotApplied,
    PgBouncerObjects,
    applied_default_pool_size,
    desired_pgbouncer,
)
from pgrelief.manifests.pgbouncer_config import ServerInputs
from pgrelief.observe import pgbouncer_auth_check
from pgrelief.pgbouncer_auth import auth_condition, auth_databases
from pgrelief.policy import Condition, ConnectionPolicy
from pgrelief.snapshot import Snapshot

log = logging.getLogger(__name__)

AUTH_RECHECK_S = 15.0  # a missing lookup function is looked for again this often
KINDS = ("ConfigMap", "Service", "PodDisruptionBudget", "Deployment")


@dataclass
class Outcome:
    """What one reconcile leaves: the condition to show (None: pooler disabled), Events."""

    condition: Condition | None
    notes: list[EventNote] = field(default_factory=list)


class PgBouncerReconciler:
    """The PgBouncer of one ConnectionPolicy."""

    def __init__(self, kube: Kube, owner: Owner) -> None:
        self.kube = kube
        self.owner = owner
        self.name = object_name(owner.name)
        # What the cluster has, as kopf's watch last reported it (kind -> object, None: gone).
        self.live: dict[str, Manifest | None] = {}
        self.applied: dict[str, str] = {}  # kind -> spec hash pgrelief last applied
        self.applies = 0
        self._auth_checked_at = 0.0
        self._auth_condition: Condition | None = None
        self._auth_key: str | None = None
        self._enabled_before = False

    def observed(self, kind: str, body: Mapping[str, Any] | None) -> None:
        """kopf saw ``kind`` change (None: deleted): remember it; the next reconcile looks."""
        self.live[kind] = None if body is None else dict(body)

    def reconcile(
        self,
        policy: ConnectionPolicy,
        snapshot: Snapshot,
        connect_to: Callable[[str], psycopg.Connection[Any]],
    ) -> Outcome:
        desired = desired_pgbouncer(
            self.owner,
            policy.spec,
            ServerInputs.from_snapshot(snapshot),
            previous_default_pool_size=applied_default_pool_size(self.live.get("ConfigMap")),
        )
        if desired is None:
            if self._enabled_before:
                self._remove()
            self._enabled_before = False
            return Outcome(None)
        self._enabled_before = True
        if isinstance(desired, NotApplied):
            return Outcome(desired.condition(), [desired.note()])
        waiting = self._auth_ready(policy, desired, connect_to)
        if waiting is not None:
            return Outcome(waiting)
        changed = self._apply(desired)
        notes = [desired.reconciled_note()] if changed else []
        deployment = self.live.get("Deployment") or {}
        available = int((deployment.get("status") or {}).get("availableReplicas") or 0)
        return Outcome(desired.condition(available), notes)

    # ---- applying -----------------------------------------------------------------------
    def _apply(self, desired: PgBouncerObjects) -> bool:
        """Server-side apply every object that differs from what the cluster has."""
        changed = False
        for manifest in desired.all():
            kind = manifest["kind"]
            if not self._differs(kind, manifest):
                continue
            applied = self.kube.apply(manifest)
            self.live[kind] = applied
            self.applied[kind] = manifest["metadata"]["annotations"][SPEC_HASH]
            self.applies += 1
            changed = True
        return changed

    def _differs(self, kind: str, manifest: Manifest) -> bool:
        wanted_hash = manifest["metadata"]["annotations"][SPEC_HASH]
        if kind not in self.live:
            # Never seen (a new worker, or kopf has not reported it yet): ask once.
            self.live[kind] = self.kube.read(kind, self.owner.namespace, self.name)
        live = self.live[kind]
        if live is None:
            return True
        live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH)
        if live_hash != wanted_hash:
            return True
        # The hash annotation survives a hand edit of the content; the content itself must
        # be what pgrelief wrote. (Other kinds are compared by hash: the API server fills
        # in defaults, so their live spec never equals the built one.)
        return kind == "ConfigMap" and live.get("data") != manifest.get("data")

    def _remove(self) -> None:
        for kind in KINDS:
            try:
                self.kube.delete(kind, self.owner.namespace, self.name)
            except KubeError as error:
                log.warning("could not delete %s %s: %s", kind, self.name, error)
            self.live[kind] = None
        self.applied.clear()

    # ---- auth_query ---------------------------------------------------------------------
    def _auth_ready(
        self,
        policy: ConnectionPolicy,
        desired: PgBouncerObjects,
        connect_to: Callable[[str], psycopg.Connection[Any]],
    ) -> Condition | None:
        """None when clients can log in through auth_query (or it is not used)."""
        query = policy.spec.pgbouncer.auth.auth_query
        if query is None:
            return None
        key = desired.config_map["metadata"]["annotations"][SPEC_HASH]
        fresh = key != self._auth_key
        if not fresh and self._auth_condition is None:
            return None
        if not fresh and time.monotonic() - self._auth_checked_at < AUTH_RECHECK_S:
            return self._auth_condition
        checks = []
        for database in auth_databases(policy.spec.pgbouncer, desired.version):
            with connect_to(database) as conn:
                checks.append(pgbouncer_auth_check(conn, query))
        self._auth_key = key
        self._auth_checked_at = time.monotonic()
        self._auth_condition = auth_condition(checks, query)
        return self._auth_condition
