"""Which sessions the policy lets pgrelief touch at all: protections, then selectors.

Every session rule (terminate, cancel, escalate) asks the same two questions here before
anything else, so they cannot disagree: is the session protected (DESIGN.md's safety rules
and ``remediation.protect``, decided by ``pgrelief.protection``, which `diagnose` asks too),
and is it among the sessions ``remediation.select`` includes? Protections are asked first and
always win: a session both selected and protected is spared as protected.

Selectors match like protections: application names exactly or as a glob pattern
(``checkout-*``), roles and databases exactly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from pgrelief import protection as rules
from pgrelief.advice import quote_literal
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.policy import ProtectSpec, SelectSpec
from pgrelief.protection import is_superuser, matching_application
from pgrelief.snapshot import Session, Snapshot

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["is_superuser", "matching_application", "not_selected", "protect_of", "protection"]


def protect_of(protect: ProtectSpec, networks: Sequence[Network] | None = None) -> rules.Protect:
    """A policy's ``protect`` section as the plain values ``pgrelief.protection`` reads."""
    return rules.Protect(
        superusers=protect.superusers,
        listeners=protect.listeners,
        roles=frozenset(protect.roles),
        applications=frozenset(protect.applications),
        databases=frozenset(protect.databases),
        networks=tuple(protect.networks() if networks is None else networks),
        workloads=tuple((w.kind, w.namespace, w.name) for w in protect.workloads),
    )


def protection(
    session: Session, snapshot: Snapshot, protect: ProtectSpec | rules.Protect
) -> str | None:
    """Why ``session`` must not be terminated or cancelled, or None when it may be.

    Pass the ``rules.Protect`` of ``protect_of`` when asking for many sessions: converting
    the policy's section (and parsing its CIDRs) once is the point of it.
    """
    plain = protect if isinstance(protect, rules.Protect) else protect_of(protect)
    spared = rules.protection(session, snapshot, plain)
    return None if spared is None else spared.text


def not_selected(session: Session, select: SelectSpec, snapshot: Snapshot) -> str | None:
    """Why ``session`` is outside ``remediation.select``, or None when it is included."""
    if select.roles and session.usename not in select.roles:
        return f"role {_name(session.usename)} not in select.roles"
    if (
        select.applications
        and matching_application(session.application_name, select.applications) is None
    ):
        return (
            f"application {quote_literal(session.application_name)} "
            "not matched by select.applications"
        )
    if select.databases and session.datname not in select.databases:
        return f"database {_name(session.datname)} not in select.databases"
    if select.workloads:
        return _outside_workloads(session, select, snapshot)
    return None


def _outside_workloads(session: Session, select: SelectSpec, snapshot: Snapshot) -> str | None:
    """Include-only errs on the side of acting less: a session that cannot be placed on one
    workload is not selected (unlike protect.workloads, where "may come from" spares)."""
    if snapshot.attribution is None:
        return "select.workloads is set but sessions are not placed on workloads (no pod index)"
    origin = snapshot.attribution.origins.get(session.pid)
    workload = origin.workload if origin is not None else None
    if workload is None:
        why = f" ({origin.why})" if origin is not None and origin.why else ""
        return f"not placed on a workload{why}: select.workloads selects only placed sessions"
    if any(workload.matches(w.kind, w.namespace, w.name) for w in select.workloads):
        return None
    return f"{workload.label} not matched by select.workloads"


def _name(name: str | None) -> str:
    return "(unknown)" if name is None else quote_ident(name)
