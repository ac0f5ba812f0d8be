"""Which sessions the policy lets pgrelief touch at all: protections, then selectors.

Every session rule (terminate, cancel, escalate) asks the same two questions here before
anything else, so they cannot disagree: is the session protected (DESIGN.md's safety rules
and ``remediation.protect``), and is it among the sessions ``remediation.select`` includes?
Protections are asked first and always win: a session both selected and protected is spared
as protected.

Application names match an entry exactly or as a glob pattern (``checkout-*``; ``fnmatch``
rules, case-sensitive); roles and databases match exactly, like PostgreSQL names. An exact
match is tried first so a name containing glob characters (``api [eu]``) still matches itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from fnmatch import fnmatchcase

from pgrelief.advice import quote_literal
from pgrelief.advice import quoted_name as quote_ident
from pgrelief.policy import ProtectSpec, SelectSpec
from pgrelief.snapshot import CLIENT_BACKEND, Session, Snapshot

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def protection(
    session: Session,
    snapshot: Snapshot,
    protect: ProtectSpec,
    networks: Sequence[Network] | None = None,
) -> str | None:
    """Why ``session`` must not be terminated or cancelled, or None when it may be."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if snapshot.own_pid is not None and session.pid == snapshot.own_pid:
        return "pgrelief's own session"
    if protect.superusers:
        superuser = is_superuser(session, snapshot)
        if superuser is None:
            return "superuser status unknown (protect.superusers)"
        if superuser:
            return "superuser (protect.superusers)"
    if session.usename is not None and session.usename in protect.roles:
        return f"protected role {quote_ident(session.usename)}"
    pattern = matching_application(session.application_name, protect.applications)
    if pattern is not None:
        shown = quote_literal(session.application_name)
        if pattern == session.application_name:
            return f"protected application {shown}"
        return f"protected application {shown} (matches {quote_literal(pattern)})"
    if session.datname is not None and session.datname in protect.databases:
        return f"protected database {quote_ident(session.datname)}"
    network = _covering_network(
        session.client_addr, protect.networks() if networks is None else networks
    )
    if network is not None:
        return f"protected client address {session.client_addr} (in {network})"
    if protect.listeners and session.is_listener:
        return "LISTEN session (protect.listeners)"
    return None


def not_selected(session: Session, select: SelectSpec) -> str | None:
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
    return None


def matching_application(name: str, patterns: Sequence[str]) -> str | None:
    """The first entry of ``patterns`` that ``name`` equals or matches as a glob, if any."""
    if name in patterns:
        return name
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def is_superuser(session: Session, snapshot: Snapshot) -> bool | None:
    """The session's role's superuser flag, from the session or pg_roles; None if unknown."""
    if session.is_superuser is not None:
        return session.is_superuser
    role = snapshot.roles.get(session.usename) if session.usename is not None else None
    return role.is_superuser if role is not None else None


def _name(name: str | None) -> str:
    return "(unknown)" if name is None else quote_ident(name)


def _covering_network(address: str | None, networks: Sequence[Network]) -> Network | None:
    if address is None or not networks:
        return None
    try:
        parsed = ipaddress.ip_address(address.split("/")[0])
    except ValueError:
        return None
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [parsed]
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        forms.append(parsed.ipv4_mapped)
    for network in networks:
        if any(form.version == network.version and form in network for form in forms):
            return network
    return None
