"""Which sessions pgrelief never terminates: one rule for what `run` spares and `diagnose` proposes.

`run` spares sessions by the policy's ``protect`` section; `diagnose` has no policy, yet the
terminate statements it prints must not target what `run` would protect by default (LISTEN
sessions, superusers, pgrelief's own session). Both ask this module, so the two can never
disagree. It sits below ``diagnose`` and ``policy`` (which may not import each other) and
takes the protections as plain values: ``plan`` converts a policy's ``ProtectSpec`` into a
``Protect``; ``RUN_DEFAULTS`` is what a policy protects when it says nothing (a test keeps the
two equal).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import NamedTuple

from pgrelief.advice import quote_literal, quoted_name
from pgrelief.snapshot import CLIENT_BACKEND, Session, Snapshot

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Why a session is spared: the rule's name (stable, for code) beside the text people read.
NOT_CLIENT = "not_client"
OWN = "own"
SUPERUSER = "superuser"
SUPERUSER_UNKNOWN = "superuser_unknown"
ROLE = "role"
APPLICATION = "application"
DATABASE = "database"
NETWORK = "network"
LISTENER = "listener"


@dataclass(frozen=True, slots=True)
class Protect:
    """The protections in force: a policy's ``protect`` section as plain values."""

    superusers: bool = True
    listeners: bool = True
    roles: frozenset[str] = frozenset()
    applications: frozenset[str] = frozenset()
    databases: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()


RUN_DEFAULTS = Protect()


class Spared(NamedTuple):
    """A session that must not be terminated: which rule, and why in words."""

    rule: str
    text: str


def protection(
    session: Session, snapshot: Snapshot, protect: Protect = RUN_DEFAULTS
) -> Spared | None:
    """Why ``session`` must not be terminated, or None when it may be.

    Only client backends are candidates, never pgrelief's own session; a session whose
    superuser status is unknown counts as a superuser while superusers are protected.
    """
    if session.backend_type != CLIENT_BACKEND:
        return Spared(NOT_CLIENT, f"not a client backend ({session.backend_type})")
    if snapshot.own_pid is not None and session.pid == snapshot.own_pid:
        return Spared(OWN, "pgrelief's own session")
    if protect.superusers:
        superuser = is_superuser(session, snapshot)
        if superuser is None:
            return Spared(SUPERUSER_UNKNOWN, "superuser status unknown (protect.superusers)")
        if superuser:
            return Spared(SUPERUSER, "superuser (protect.superusers)")
    if session.usename is not None and session.usename in protect.roles:
        return Spared(ROLE, f"protected role {quoted_name(session.usename)}")
    if session.application_name in protect.applications:
        return Spared(
            APPLICATION, f"protected application {quote_literal(session.application_name)}"
        )
    if session.datname is not None and session.datname in protect.databases:
        return Spared(DATABASE, f"protected database {quoted_name(session.datname)}")
    network = covering_network(session.client_addr, protect.networks)
    if network is not None:
        return Spared(NETWORK, f"protected client address {session.client_addr} (in {network})")
    if protect.listeners and session.is_listener:
        return Spared(LISTENER, "LISTEN session (protect.listeners)")
    return None


def is_superuser(session: Session, snapshot: Snapshot) -> bool | None:
    """The session's role's superuser flag, from the session or pg_roles; None if unknown."""
    if session.is_superuser is not None:
        return session.is_superuser
    role = snapshot.roles.get(session.usename) if session.usename is not None else None
    return role.is_superuser if role is not None else None


def covering_network(address: str | None, networks: Sequence[Network]) -> Network | None:
    """The first of ``networks`` holding ``address`` (IPv4-mapped IPv6 included), if any."""
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


# What protection() reads of a session, but its pid (which matters only for pgrelief's own
# session, handled apart), under a given Protect: an empty list of roles, applications,
# databases or networks reads nothing. A rule that reads another attribute must be added
# here, or protections() would reuse a verdict for sessions the rule tells apart.
def _key_for(protect: Protect, snapshot: Snapshot) -> attrgetter[tuple[object, ...]]:
    wanted = ["backend_type"]
    if protect.superusers:
        wanted.append("is_superuser")
        if snapshot.roles:  # the role's flag is looked up by name when the session's is unknown
            wanted.append("usename")
    if protect.roles:
        wanted.append("usename")
    if protect.applications:
        wanted.append("application_name")
    if protect.databases:
        wanted.append("datname")
    if protect.networks:
        wanted.append("client_addr")
    if protect.listeners:
        wanted.append("query")
    # Two names at least, so the getter returns tuples whatever the protections.
    return attrgetter("backend_type", *dict.fromkeys(wanted))


_PID = attrgetter("pid")


def protections(
    sessions: Sequence[Session], snapshot: Snapshot, protect: Protect = RUN_DEFAULTS
) -> list[Spared | None]:
    """``protection()`` of each session, in order: the same rule, asked once per distinct
    combination of what it reads (role, query, ...) instead of once per session.

    Diagnosing 100k sessions asks this of tens of thousands of candidates that share a few
    hundred such combinations.
    """
    found, _unknown = _by_key(sessions, snapshot, protect, besides_superusers=False)
    return found


def spared_by_default(
    sessions: Sequence[Session], snapshot: Snapshot
) -> tuple[list[Spared | None], bool]:
    """Why each session is left out of diagnose's statements (None: it may be in them), and
    whether some of those kept are of unknown superuser status.

    Run's default protections, except that an unknown superuser status is no reason to leave
    a session out (a dump has no pg_roles): diagnose's statements re-check rolsuper on the
    server instead. The other protections still apply to such a session (a LISTEN session).
    """
    return _by_key(sessions, snapshot, RUN_DEFAULTS, besides_superusers=True)


def _by_key(
    sessions: Sequence[Session], snapshot: Snapshot, protect: Protect, *, besides_superusers: bool
) -> tuple[list[Spared | None], bool]:
    keys = list(map(_key_for(protect, snapshot), sessions))
    own_pid = snapshot.own_pid
    unknown = False
    besides = replace(protect, superusers=False)

    def ask(session: Session) -> Spared | None:
        nonlocal unknown
        why = protection(session, snapshot, protect)
        if besides_superusers and why is not None and why.rule == SUPERUSER_UNKNOWN:
            # `besides` reads a subset of what `protect` reads: valid for the whole key.
            why = protection(session, snapshot, besides)
            unknown = unknown or why is None
        return why

    # One session per key, the last one seen (C-level); pgrelief's own is asked apart.
    representatives = dict(zip(keys, sessions, strict=True))
    verdicts = {key: ask(s) for key, s in representatives.items() if s.pid != own_pid}
    own_at: int | None = None
    if own_pid is not None:
        pids = list(map(_PID, sessions))
        if own_pid in pids:
            own_at = pids.index(own_pid)
            if keys[own_at] not in verdicts:
                others = [s for k, s in zip(keys, sessions, strict=True) if k == keys[own_at]]
                other = next((s for s in others if s.pid != own_pid), None)
                verdicts[keys[own_at]] = None if other is None else ask(other)
    found = list(map(verdicts.__getitem__, keys))
    if own_at is not None:
        found[own_at] = protection(sessions[own_at], snapshot, protect)
    return found, unknown
