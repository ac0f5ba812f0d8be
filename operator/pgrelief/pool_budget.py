"""PgBouncer pools sized from a connection budget: what the operator's pooler may open.

CloudNativePG, Zalando and Crunchy PGO all write the pool sizes a user asks for and let the
server find out: ``replicas × (default_pool_size + reserve_pool_size)`` per (database, user)
pair quietly exceeds ``max_connections`` and the pooler becomes the thing that exhausts the
server. Here the pools are fitted into a budget first:

    usable slots (max_connections − superuser_reserved_connections − reserved_connections)
  − headroom: pgrelief's lifeline, superuser sessions seen, direct clients the policy declares
  = what every replica's pools together may open

and each pool must also fit its role's ``CONNECTION LIMIT`` and its database's, when set.
``max_db_connections`` is written as exactly what was budgeted per database, so the budget
holds even for roles nobody declared (they share the cap instead of adding pools). When the
policy leaves ``defaultPoolSize`` out it is computed (capped like ``sizing``'s advice); when it
asks for more than fits, the answer says by how much and what would fit, and ``fits`` is
False: the caller writes nothing (the operator reports ``PoolOversubscribed``).

PgBouncer also needs about one file descriptor per client and per server connection
(``open_files``); a pod can raise its soft limit only up to the runtime's hard limit, so a
``maxClientConn`` that needs more than ``MAX_OPEN_FILES`` is refused here.

``sizing.pgbouncer_pool_sizes`` is the advice's older estimate (no policy, so a 10% guess at
headroom); this module is the one the operator's configuration comes from. Pure arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pgrelief.sizing import POOL_SIZE_CAP, SizeError

# pgrelief keeps one persistent monitoring connection per server (pgrelief.connection).
LIFELINE_SLOTS = 1
# Listening sockets, the log, DNS, the admin console, reloads: PgBouncer's own estimate adds
# 10 to max_client_conn + pools; 100 leaves room without mattering next to the clients.
SPARE_OPEN_FILES = 100
# The hard RLIMIT_NOFILE a container can count on: containerd 2 and Docker 25+ give
# 1024 soft / 524288 hard (systemd's default); a pod cannot raise the hard limit itself.
MAX_OPEN_FILES = 524_288


@dataclass(frozen=True, slots=True)
class PoolRequest:
    """What the policy asks for and what the server allows (inputs of ``fit_pools``)."""

    usable_slots: int
    replicas: int
    databases: tuple[str, ...]
    users: tuple[str, ...] = ()  # empty: roles are not declared, one pool per database
    default_pool_size: int | None = None  # None: computed
    reserve_pool_size: int = 0
    max_client_conn: int = 1000
    lifeline: int = LIFELINE_SLOTS
    superuser_sessions: int = 0
    direct_connections: int = 0
    role_limits: Mapping[str, int] = field(default_factory=dict)  # rolconnlimit; -1 = none
    database_limits: Mapping[str, int] = field(default_factory=dict)  # datconnlimit
    auth_user: str | None = None  # auth_query's lookup role: one connection per database
    auth_connections: int | None = None  # lookup-role connections per replica; None: databases
    pool_size_cap: int = POOL_SIZE_CAP
    # The computed default the running config has: kept while it fits and no much larger one
    # does, so the pods are not rolled each time a superuser session comes or goes.
    previous_default_pool_size: int | None = None

    @property
    def headroom(self) -> int:
        return self.lifeline + self.superuser_sessions + self.direct_connections

    @property
    def budget(self) -> int:
        return self.usable_slots - self.headroom

    @property
    def pools_per_database(self) -> int:
        return max(len(self.users), 1)

    @property
    def auth_per_database(self) -> int:
        return 1 if self.auth_user is not None else 0


@dataclass(frozen=True, slots=True)
class PoolBudget:
    """The sizes to write, whether they fit, and the reasons, for one PgBouncer Deployment."""

    request: PoolRequest
    default_pool_size: int
    reserve_pool_size: int
    max_db_connections: int  # per replica and database: every pool of it, auth included
    server_connections: int  # all replicas together, at most
    open_files: int  # per pod
    fits: bool
    over_by: int  # server connections beyond the budget (0 when they fit it)
    fitting_default_pool_size: int | None  # the largest that fits, None when none does
    problems: tuple[str, ...]
    reasoning: tuple[str, ...]  # every number, observations included (status, Events)
    config_notes: tuple[str, ...]  # what depends on the spec and the sizes only (the ini)

    @property
    def budget(self) -> int:
        return self.request.budget

    def message(self) -> str:
        """One paragraph for a condition or Event: what is wrong and what would fit."""
        if self.fits:
            return (
                f"{self.server_connections} server connections at most, within the "
                f"{self.budget} the budget allows"
            )
        return "; ".join(self.problems)


def _floor_div(numerator: int, denominator: int) -> int:
    return numerator // max(denominator, 1)


def _per_pool_limits(request: PoolRequest) -> list[tuple[int, str]]:
    """The most server connections one (database, user) pool may have, per constraint."""
    r, d, u, a = (
        request.replicas,
        len(request.databases),
        request.pools_per_database,
        request.auth_per_database,
    )
    limits = [
        (
            (_floor_div(request.budget, r * d) - a) // u,
            f"the server budget of {request.budget}",
        )
    ]
    for user in request.users:
        limit = request.role_limits.get(user, -1)
        if limit >= 0:
            limits.append(
                (
                    _floor_div(limit, r * d),
                    f"role {user!r} CONNECTION LIMIT {limit}, shared by {r} replica(s) × "
                    f"{d} database(s),",
                )
            )
    for database in request.databases:
        limit = request.database_limits.get(database, -1)
        if limit >= 0:
            limits.append(
                (
                    (_floor_div(limit, r) - a) // u,
                    f"database {database!r} CONNECTION LIMIT {limit}, shared by {r} replica(s) "
                    f"× {u} user pool(s){' + auth' if a else ''},",
                )
            )
    return limits


def fit_pools(request: PoolRequest) -> PoolBudget:
    """Pool sizes for ``request``: the requested ones when they fit, else why not and what would.

    A SizeError is raised only for inputs that are not a pooler at all (no replica, no
    database, a negative size); an oversubscribed request is an answer, not an error.
    """
    if request.replicas < 1 or not request.databases:
        raise SizeError("a PgBouncer budget needs at least one replica and one database")
    if request.reserve_pool_size < 0 or (request.default_pool_size or 1) < 1:
        raise SizeError("pool sizes must be positive (reserve_pool_size may be 0)")
    if request.usable_slots < 0:
        raise SizeError("usable slots cannot be negative")
    r, d, u, a = (
        request.replicas,
        len(request.databases),
        request.pools_per_database,
        request.auth_per_database,
    )
    reserve = request.reserve_pool_size
    limits = _per_pool_limits(request)
    per_pool_max = min(limit for limit, _ in limits)
    fitting = per_pool_max - reserve if per_pool_max - reserve >= 1 else None
    previous = request.previous_default_pool_size
    if request.default_pool_size is not None:
        default = request.default_pool_size
    elif fitting is None:
        default = 1
    else:
        default = min(fitting, request.pool_size_cap)
        # Sticky: a previous size that still fits stays unless a clearly larger one fits now.
        if (
            previous is not None
            and 1 <= previous <= fitting
            and default - previous < max(2, previous // 4)
        ):
            default = previous
    per_pool = default + reserve
    per_database = u * per_pool + a
    server = r * d * per_database
    over_by = max(0, server - request.budget)
    open_files = request.max_client_conn + d * per_database + SPARE_OPEN_FILES

    problems: list[str] = []
    if over_by:
        problems.append(
            f"the pools need {server} server connections ({_shape(request, default)}) but only "
            f"{request.budget} fit ({_budget_text(request)}): {over_by} too many"
        )
    for limit, source in limits[1:]:
        if per_pool > limit:
            problems.append(
                f"{source} leaves {max(limit, 0)} per pool, the pools ask "
                f"{per_pool} (defaultPoolSize {default} + reservePoolSize {reserve})"
            )
    if problems:
        problems.append(_what_fits(request, per_pool_max, fitting))
    auth_connections = d if request.auth_connections is None else request.auth_connections
    if request.auth_user is not None:
        limit = request.role_limits.get(request.auth_user, -1)
        if 0 <= limit < r * auth_connections:
            problems.append(
                f"lookup role {request.auth_user!r} CONNECTION LIMIT {limit} is below the "
                f"{r * auth_connections} connections {r} replica(s) use for auth_query"
            )
    if open_files > MAX_OPEN_FILES:
        problems.append(
            f"maxClientConn {request.max_client_conn} needs {open_files} open files per pod, "
            f"more than the {MAX_OPEN_FILES} a container can count on: use at most "
            f"{MAX_OPEN_FILES - (open_files - request.max_client_conn)}"
        )
    if request.default_pool_size is not None:
        origin = "from the policy"
    elif (
        default == previous
        and fitting is not None
        and min(fitting, request.pool_size_cap) != default
    ):
        origin = "computed earlier, still fits"
    elif fitting is not None and fitting > default:
        origin = f"computed, capped at {request.pool_size_cap}"
    else:
        origin = "computed"
    sizes = (
        f"default_pool_size {default} ({origin}) + reserve_pool_size {reserve}; "
        f"max_db_connections {per_database} per database",
        f"each pod opens at most {d * per_database} server connections: {d} database(s) × "
        f"{_pools_text(request, default)}",
        f"open files per pod: max_client_conn {request.max_client_conn} + {d * per_database} "
        f"server connections + {SPARE_OPEN_FILES} spare = {open_files}",
    )
    reasoning = (
        f"server connection budget: {_budget_text(request)} = {request.budget}",
        f"pools per replica: {d} database(s) × {u} user pool(s)"
        + (" + 1 auth_query connection per database" if a else "")
        + f"; each pool may have {max(per_pool_max, 0)} ({limits_text(limits)})",
        sizes[0],
        f"all replicas open at most {server}: {_shape(request, default)}",
        *sizes[1:],
    )
    return PoolBudget(
        request=request,
        default_pool_size=default,
        reserve_pool_size=reserve,
        max_db_connections=per_database,
        server_connections=server,
        open_files=open_files,
        fits=not problems,
        over_by=over_by,
        fitting_default_pool_size=fitting,
        problems=tuple(problems),
        reasoning=reasoning,
        config_notes=sizes[1:],
    )


def limits_text(limits: list[tuple[int, str]]) -> str:
    return "; ".join(f"{source.rstrip(',')}: {max(limit, 0)}" for limit, source in limits)


def _pools_text(request: PoolRequest, default: int) -> str:
    text = (
        f"({request.pools_per_database} user pool(s) × ({default} + "
        f"{request.reserve_pool_size} reserve)"
    )
    return text + (" + 1 auth)" if request.auth_per_database else ")")


def _shape(request: PoolRequest, default: int) -> str:
    return f"{request.replicas} replica(s) × {len(request.databases)} database(s) × " + _pools_text(
        request, default
    )


def _budget_text(request: PoolRequest) -> str:
    return (
        f"{request.usable_slots} usable slots − {request.lifeline} pgrelief lifeline − "
        f"{request.superuser_sessions} superuser session(s) − {request.direct_connections} "
        "declared direct connection(s)"
    )


def _what_fits(request: PoolRequest, per_pool_max: int, fitting: int | None) -> str:
    if fitting is not None:
        return (
            f"what fits: defaultPoolSize {fitting} or less with reservePoolSize "
            f"{request.reserve_pool_size}"
        )
    if per_pool_max >= 1:
        return (
            f"what fits: {per_pool_max} connection(s) per pool, e.g. defaultPoolSize 1 with "
            f"reservePoolSize {per_pool_max - 1}"
        )
    one = (
        request.replicas
        * len(request.databases)
        * (request.pools_per_database + request.auth_per_database)
    )
    return (
        f"nothing fits: even one connection per pool needs {one} server connections; lower "
        "replicas, databases or users, lower directConnections, or raise max_connections"
    )


def connection_limits(observed: Mapping[str, int], declared: Mapping[str, int]) -> dict[str, int]:
    """The limit each role or database will have: the stricter of the server's current one and
    the one the policy applies (``-1`` = none), so pools fit before and after pgrelief acts."""
    merged: dict[str, int] = {}
    for name in {*observed, *declared}:
        values = [v for v in (observed.get(name, -1), declared.get(name, -1)) if v >= 0]
        merged[name] = min(values) if values else -1
    return merged
