"""Connection-slot and memory arithmetic: how many connections a server and its pools can take.

``pgrelief size`` answers "what should max_connections be on this machine", the
``memory_overcommit`` finding asks the same question of a running server, and the PgBouncer
ConfigMap needs pool sizes that fit the server's usable slots. All three use the numbers here,
so the advice a user reads during an incident and the configuration the operator writes agree.

The memory model is deliberately the pessimistic one from the domain reference: every backend
costs a base (catalog caches, per-session state) plus two ``work_mem`` allocations (one sort and
one hash, the common busy query) plus ``temp_buffers``; autovacuum workers each take
``maintenance_work_mem``; ``shared_buffers`` is allocated once; the OS keeps a reserve for
itself and the page cache PostgreSQL reads through.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

KB = 1024
MB = 1024**2
GB = 1024**3
TB = 1024**4

# PostgreSQL's own defaults, used when a setting was not observed.
DEFAULT_SHARED_BUFFERS = 128 * MB
DEFAULT_WORK_MEM = 4 * MB
DEFAULT_TEMP_BUFFERS = 8 * MB
DEFAULT_MAINTENANCE_WORK_MEM = 64 * MB
DEFAULT_AUTOVACUUM_MAX_WORKERS = 3
# The domain reference's "5-10 MB per idle connection": the pessimistic end.
DEFAULT_PER_BACKEND = 10 * MB

# Above a few hundred backends lock contention and context switching cost more than the extra
# connections give; below ~100 a server cannot serve direct clients and admins side by side.
RECOMMENDED_MIN_CONNECTIONS = 100
RECOMMENDED_MAX_CONNECTIONS = 300
RECOMMENDED_SUPERUSER_RESERVED = 5
# The domain reference's "20-50 actual PostgreSQL backend connections" per pool.
POOL_SIZE_CAP = 50

_UNITS: dict[str, int] = {"": 1, "k": KB, "m": MB, "g": GB, "t": TB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A memory size that cannot be read, or sizing inputs that leave no room to connect."""


def parse_size(text: str) -> int:
    """Bytes in a size like ``16GB``, ``512mb``, ``1.5G``, ``64kB`` (binary multiples, like PG).

    A bare number is refused: PostgreSQL reads one in the setting's own unit (8kB blocks for
    shared_buffers, kB for work_mem), so guessing would be wrong half the time.
    """
    match = _SIZE.match(text)
    if match is None or (not match.group(2) and not match.group(3)):
        raise SizeError(
            f"cannot read size {text!r}; expected a number with a unit, e.g. 512MB, 16GB "
            "(units: B, kB, MB, GB, TB)"
        )
    value = float(match.group(1))
    return round(value * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    """The shortest readable spelling of ``size`` bytes (``16GB``, ``1.5GB``, ``640kB``)."""
    for unit, name in ((TB, "TB"), (GB, "GB"), (MB, "MB"), (KB, "kB")):
        if abs(size) >= unit:
            value = size / unit
            if value == int(value):
                return f"{int(value)}{name}"
            return f"{value:.1f}{name}"
    return f"{size}B"


def pg_memory_setting(size: int) -> str:
    """``size`` bytes as a PostgreSQL memory setting value (integer in the largest exact unit)."""
    for unit, name in ((TB, "TB"), (GB, "GB"), (MB, "MB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{max(size // KB, 0)}kB"


def os_reserve(ram: int) -> int:
    """Memory left to the kernel, other processes and the page cache PostgreSQL reads through."""
    return max(512 * MB, ram // 10)


def headroom_slots(usable_slots: int) -> int:
    """Slots kept free of any pool: admins, migrations, monitoring (pgrelief itself), cron jobs."""
    return min(max(3, math.ceil(usable_slots * 0.1)), usable_slots // 2)


def fair_share(usable_slots: int, roles: int, role_limit: int | None = None) -> int:
    """One role's share of the slots left after headroom, split evenly between ``roles``."""
    share = max(1, (usable_slots - headroom_slots(usable_slots)) // max(roles, 1))
    if role_limit is not None and role_limit >= 0:
        share = min(share, max(role_limit, 1))
    return share


def pool_per_instance(share: int, instances: int) -> int:
    """An application pool size per instance so that all instances together stay in ``share``."""
    return max(1, share // max(instances, 1))


@dataclass(frozen=True, slots=True)
class ConnectionShare:
    """What one role (or database) may hold, and one of its applications: the one sizing of
    diagnose's advice.

    Every finding that names a CONNECTION LIMIT or an application's pool size reads it from
    here, so a report never tells one role two different numbers.
    """

    room: int  # usable slots minus headroom
    fair: int  # room split evenly between the consumers (roles or databases)
    demand: int  # the role's active sessions × 1.2, rounded up
    limit: int  # the role's connections: max(fair, demand) within room and its own limit
    capped_by: int | None  # the role's existing CONNECTION LIMIT, when it is the lower one
    application: int  # of which this application's instances together (by their sessions)
    per_instance: int  # one instance's pool


def connection_share(
    usable_slots: int,
    consumers: int,
    *,
    active: int = 0,
    current_limit: int | None = None,
    role_sessions: int = 0,
    application_sessions: int = 0,
    instances: int = 1,
) -> ConnectionShare:
    """A role's (or database's) connection budget and one application's pool within it.

    The budget is an even share, between the ``consumers`` (roles, or databases), of the slots
    left after headroom, or what its active sessions need (× 1.2) if more; never more than
    that room nor than a CONNECTION LIMIT it already has. An application sharing the role gets
    the part of the budget its sessions hold now, split between its instances (addresses).
    """
    room = max(usable_slots - headroom_slots(usable_slots), 1)
    fair = max(1, room // max(consumers, 1))
    demand = math.ceil(active * 1.2)
    limit = min(max(fair, demand), room)
    capped_by = None
    if current_limit is not None and 0 <= current_limit < limit:
        limit = max(current_limit, 1)
        capped_by = current_limit
    application = limit
    if 0 < application_sessions < role_sessions:
        application = max(1, limit * application_sessions // role_sessions)
    return ConnectionShare(
        room=room,
        fair=fair,
        demand=demand,
        limit=limit,
        capped_by=capped_by,
        application=application,
        per_instance=pool_per_instance(application, instances),
    )


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """The per-server memory settings the worst-case formula needs, in bytes."""

    shared_buffers: int = DEFAULT_SHARED_BUFFERS
    work_mem: int = DEFAULT_WORK_MEM
    temp_buffers: int = DEFAULT_TEMP_BUFFERS
    maintenance_work_mem: int = DEFAULT_MAINTENANCE_WORK_MEM
    autovacuum_max_workers: int = DEFAULT_AUTOVACUUM_MAX_WORKERS
    per_backend: int = DEFAULT_PER_BACKEND

    @property
    def per_connection(self) -> int:
        return self.per_backend + 2 * self.work_mem + self.temp_buffers

    @property
    def fixed(self) -> int:
        return self.shared_buffers + self.maintenance_work_mem * self.autovacuum_max_workers

    def worst_case(self, max_connections: int) -> int:
        return self.fixed + max_connections * self.per_connection

    def connections_within(self, budget: int) -> int:
        """How many connections fit in ``budget`` bytes next to the fixed allocations."""
        return max(0, (budget - self.fixed) // self.per_connection)

    def formula(self, max_connections: int) -> str:
        """The worst case spelled out with this model's numbers, for evidence lines."""
        return (
            f"shared_buffers {format_size(self.shared_buffers)}"
            f" + max_connections {max_connections}"
            f" × (per-backend {format_size(self.per_backend)}"
            f" + 2 × work_mem {format_size(self.work_mem)}"
            f" + temp_buffers {format_size(self.temp_buffers)})"
            f" + maintenance_work_mem {format_size(self.maintenance_work_mem)}"
            f" × autovacuum_max_workers {self.autovacuum_max_workers}"
            f" = {format_size(self.worst_case(max_connections))}"
        )


def recommended_max_connections(memory_ceiling: int) -> int:
    """Cap what memory allows at the 100-300 range that performs well; never above memory."""
    capped = min(memory_ceiling, RECOMMENDED_MAX_CONNECTIONS)
    if capped > RECOMMENDED_MIN_CONNECTIONS:
        capped -= capped % 10
    return capped


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """PgBouncer pool sizes that keep every replica's server connections within usable slots.

    ``server_connection_budget`` is what all replicas together may open; each replica opens at
    most ``max_db_connections`` per database whatever ``default_pool_size`` and the number of
    (database, user) pools, so the budget holds even with more pools than expected.
    """

    default_pool_size: int
    reserve_pool_size: int
    max_client_conn: int
    max_db_connections: int
    server_connection_budget: int
    direct_slots: int
    replicas: int
    pools: int
    reasoning: tuple[str, ...]


def pgbouncer_pool_sizes(
    usable_slots: int,
    replicas: int = 1,
    *,
    pools: int = 1,
    databases: int = 1,
    client_connections: int = 0,
    direct_slots: int | None = None,
    pool_size_cap: int = POOL_SIZE_CAP,
) -> PoolSizes:
    """Size PgBouncer so ``replicas`` instances of ``pools`` (database, user) pools fit the server.

    ``direct_slots`` are kept for clients that bypass PgBouncer (admins, migrations, session-mode
    applications, pgrelief); by default ``headroom_slots(usable_slots)``. ``client_connections``
    is the application side's connection count; ``max_client_conn`` leaves it double room.
    """
    if usable_slots < 0 or replicas < 1 or pools < 1 or databases < 1:
        raise SizeError(
            "pool sizing needs usable_slots >= 0 and at least one replica, pool and database"
        )
    direct = headroom_slots(usable_slots) if direct_slots is None else max(direct_slots, 0)
    direct = min(direct, usable_slots)
    budget = usable_slots - direct
    per_replica = budget // replicas
    per_database = max(1, per_replica // databases)
    per_pool = per_replica // pools
    reserve = max(1, per_pool // 6) if per_pool >= 2 else 0
    default = max(per_pool - reserve, 1)
    capped = default > pool_size_cap
    if capped:
        default = pool_size_cap
        reserve = min(reserve, max(1, pool_size_cap // 5))
    max_client = max(1000, math.ceil(client_connections * 2 / replicas / 100) * 100)
    lines = [
        f"server connection budget: usable slots {usable_slots} − {direct} kept for direct "
        f"connections (admins, migrations, monitoring, session-mode clients) = {budget}",
        f"per PgBouncer replica: {budget} / {replicas} replica(s) = {per_replica}; "
        f"max_db_connections = {per_replica} / {databases} database(s) = {per_database}",
        f"per (database, user) pool: {per_replica} / {pools} pool(s) = {per_pool} → "
        f"default_pool_size {default} + reserve_pool_size {reserve}"
        + (
            f" (capped at {pool_size_cap}: more busy backends only add contention)"
            if capped
            else ""
        ),
        f"max_client_conn {max_client}: "
        + (
            f"2 × {client_connections} client connections / {replicas} replica(s), at least 1000"
            if client_connections
            else "PgBouncer's clients are cheap; 1000 minimum"
        )
        + " (raise the open-files limit to match)",
    ]
    if budget < replicas * pools:
        lines.append(
            f"warning: {budget} server connections cannot give {replicas} replica(s) × {pools} "
            "pool(s) one connection each: reduce replicas or pools, or raise max_connections"
        )
    return PoolSizes(
        default_pool_size=default,
        reserve_pool_size=reserve,
        max_client_conn=max_client,
        max_db_connections=per_database,
        server_connection_budget=budget,
        direct_slots=direct,
        replicas=replicas,
        pools=pools,
        reasoning=tuple(lines),
    )


@dataclass(frozen=True, slots=True)
class ServerSizing:
    """The answer of ``pgrelief size``: settings to use and the reasoning behind each number."""

    ram: int
    os_reserve: int
    memory: MemoryModel
    memory_ceiling: int  # connections that fit in RAM by the worst-case formula
    max_connections: int  # recommended
    superuser_reserved_connections: int
    usable_slots: int
    pgbouncer: PoolSizes
    app_instances: int | None
    pool_per_instance_direct: int | None  # per-instance pool if apps connect straight to Postgres
    requested_pool_per_instance: int | None
    demand: int | None  # app_instances × requested pool size
    needs_pgbouncer: bool
    reasoning: tuple[str, ...]
    work_mem_lowered: bool = False  # a small server: work_mem must change too

    def settings_sql(self) -> str:
        """ALTER SYSTEM statements for the recommended settings (both need a restart)."""
        work_mem = (
            f"alter system set work_mem = '{pg_memory_setting(self.memory.work_mem)}';\n"
            if self.work_mem_lowered
            else ""
        )
        return (
            f"alter system set max_connections = '{self.max_connections}';\n"
            "alter system set superuser_reserved_connections = "
            f"'{self.superuser_reserved_connections}';\n"
            "alter system set shared_buffers = "
            f"'{pg_memory_setting(self.memory.shared_buffers)}';\n"
            + work_mem
            + "-- max_connections, superuser_reserved_connections and shared_buffers take effect "
            "after a restart"
        )


def size_server(
    ram: int,
    *,
    shared_buffers: int | None = None,
    work_mem: int | None = None,
    per_backend: int = DEFAULT_PER_BACKEND,
    temp_buffers: int = DEFAULT_TEMP_BUFFERS,
    maintenance_work_mem: int = DEFAULT_MAINTENANCE_WORK_MEM,
    autovacuum_max_workers: int = DEFAULT_AUTOVACUUM_MAX_WORKERS,
    reserve: int | None = None,
    app_instances: int | None = None,
    pool_per_instance: int | None = None,
    pgbouncer_replicas: int = 1,
) -> ServerSizing:
    """A safe max_connections for ``ram`` bytes, and pool sizes that fit it.

    Follows the domain reference: max_connections × per-backend + shared_buffers + OS reserve
    must stay below RAM; the result is capped to 100-300 and PgBouncer carries the application's
    connection count. A small server gets advice rather than an error: what the user did not
    give (shared_buffers, work_mem) is lowered, and superuser_reserved_connections kept at
    PostgreSQL's 3, until a useful max_connections fits; each step is in the reasoning.
    """
    given_work_mem = work_mem is not None
    work_mem = DEFAULT_WORK_MEM if work_mem is None else work_mem
    if ram <= 0:
        raise SizeError("--ram must be a positive size, e.g. 16GB")
    for name, value in (
        ("--work-mem", work_mem),
        ("--per-backend", per_backend),
        ("temp_buffers", temp_buffers),
        ("maintenance_work_mem", maintenance_work_mem),
    ):
        if value < 0:
            raise SizeError(f"{name} must not be negative")
    if per_backend + 2 * work_mem + temp_buffers <= 0:
        raise SizeError("--per-backend must be a positive size, e.g. 10MB")
    if autovacuum_max_workers < 0:
        raise SizeError("autovacuum_max_workers must not be negative")
    if app_instances is not None and app_instances < 1:
        raise SizeError("--app-instances must be at least 1")
    if pool_per_instance is not None and pool_per_instance < 1:
        raise SizeError("--pool-per-instance must be at least 1")
    if pool_per_instance is not None and app_instances is None:
        raise SizeError("--pool-per-instance goes with --app-instances")
    if pgbouncer_replicas < 1:
        raise SizeError("--pgbouncer-replicas must be at least 1")

    buffers = ram // 4 if shared_buffers is None else shared_buffers
    if buffers <= 0:
        raise SizeError("--shared-buffers must be a positive size, e.g. 4GB")
    kept = os_reserve(ram) if reserve is None else reserve
    model = MemoryModel(
        shared_buffers=buffers,
        work_mem=work_mem,
        temp_buffers=temp_buffers,
        maintenance_work_mem=maintenance_work_mem,
        autovacuum_max_workers=autovacuum_max_workers,
        per_backend=per_backend,
    )
    budget = ram - kept
    ceiling = model.connections_within(budget)
    superuser_reserved = RECOMMENDED_SUPERUSER_RESERVED
    small: list[str] = []
    if ceiling < superuser_reserved + MIN_USABLE_SLOTS:
        model, superuser_reserved, small = _fit_small_server(
            model, budget, shared_buffers is None, given_work_mem
        )
        ceiling = model.connections_within(budget)
        buffers = model.shared_buffers
    if ceiling < superuser_reserved + MIN_USABLE_SLOTS:
        raise SizeError(
            f"{format_size(ram)} of RAM leaves room for only {ceiling} connection(s) after "
            f"shared_buffers {format_size(buffers)}, autovacuum and an OS reserve of "
            f"{format_size(kept)}, even with work_mem {format_size(model.work_mem)}; lower "
            "--shared-buffers or add memory"
        )
    recommended = recommended_max_connections(ceiling)
    usable = recommended - superuser_reserved
    lines = [
        *small,
        f"shared_buffers {format_size(buffers)}"
        + (" (25% of RAM)" if shared_buffers is None and not small else "")
        + f"; OS and page-cache reserve {format_size(kept)}"
        + (" (10% of RAM, at least 512MB)" if reserve is None else ""),
        f"per connection, worst case: per-backend {format_size(per_backend)} + 2 × work_mem "
        f"{format_size(model.work_mem)} + temp_buffers {format_size(temp_buffers)} = "
        f"{format_size(model.per_connection)}; autovacuum: {autovacuum_max_workers} × "
        f"maintenance_work_mem {format_size(maintenance_work_mem)}",
        f"memory allows ({format_size(ram)} − {format_size(kept)} − {format_size(model.fixed)})"
        f" / {format_size(model.per_connection)} = {ceiling} connections",
    ]
    if recommended < ceiling:
        lines.append(
            f"recommend max_connections = {recommended}: past {RECOMMENDED_MAX_CONNECTIONS} "
            "backends, lock contention, context switching and buffer-mapping pressure cost "
            "more than the extra connections give; let PgBouncer carry the application's count"
        )
    else:
        lines.append(
            f"recommend max_connections = {recommended}: memory is the limit here; put "
            "PgBouncer in front so applications never need more"
        )
    lines.append(
        f"superuser_reserved_connections = {superuser_reserved} (default 3): emergency access "
        f"when the server is full; usable slots for applications = {usable}"
    )
    if small:
        lines.append(
            "a server this small serves few connections: put PgBouncer (transaction mode) in "
            "front of every application"
        )
    pool_direct: int | None = None
    demand: int | None = None
    needs_pgbouncer = False
    free_for_apps = usable - headroom_slots(usable)
    if app_instances is not None:
        pool_direct = pool_per_instance_for(usable, app_instances)
        lines.append(
            f"connecting directly, each of {app_instances} app instance(s) may pool at most "
            f"({usable} usable − {headroom_slots(usable)} headroom) / {app_instances} = "
            f"{pool_direct} connection(s)"
        )
        if pool_per_instance is not None:
            demand = app_instances * pool_per_instance
            needs_pgbouncer = demand > free_for_apps
            verdict = (
                f"exceeds the {free_for_apps} slots applications can have: put PgBouncer in "
                "front (transaction mode) or shrink the pools"
                if needs_pgbouncer
                else f"fits the {free_for_apps} slots applications can have"
            )
            lines.append(
                f"requested: {app_instances} instance(s) × pool {pool_per_instance} = "
                f"{demand} connections, which {verdict}"
            )
    pgbouncer = pgbouncer_pool_sizes(usable, pgbouncer_replicas, client_connections=demand or 0)
    lines.extend(f"PgBouncer: {line}" for line in pgbouncer.reasoning)
    return ServerSizing(
        ram=ram,
        os_reserve=kept,
        memory=model,
        memory_ceiling=ceiling,
        max_connections=recommended,
        superuser_reserved_connections=superuser_reserved,
        usable_slots=usable,
        pgbouncer=pgbouncer,
        app_instances=app_instances,
        pool_per_instance_direct=pool_direct,
        requested_pool_per_instance=pool_per_instance,
        demand=demand,
        needs_pgbouncer=needs_pgbouncer or bool(small),
        reasoning=tuple(lines),
        work_mem_lowered=model.work_mem != work_mem,
    )


MIN_USABLE_SLOTS = 5  # below this many usable slots a max_connections is no advice
SMALL_SERVER_MIN_SHARED_BUFFERS = 32 * MB
SMALL_SERVER_WORK_MEM = MB
SMALL_SERVER_SUPERUSER_RESERVED = 3  # PostgreSQL's default


def _fit_small_server(
    model: MemoryModel, budget: int, may_lower_buffers: bool, given_work_mem: bool
) -> tuple[MemoryModel, int, list[str]]:
    """Lower what the user did not set until a useful max_connections fits in ``budget``.

    Each step is tried in turn (shared_buffers to 1/8 of RAM, work_mem to 1MB, the
    superuser reserve to PostgreSQL's 3) and kept only while still needed.
    """
    lines: list[str] = []
    reserved = RECOMMENDED_SUPERUSER_RESERVED

    def fits(candidate: MemoryModel, superusers: int) -> bool:
        return candidate.connections_within(budget) >= superusers + MIN_USABLE_SLOTS

    if may_lower_buffers:
        lowered = max(model.shared_buffers // 2, SMALL_SERVER_MIN_SHARED_BUFFERS)
        if lowered < model.shared_buffers:
            lines.append(
                f"small server: shared_buffers lowered from {format_size(model.shared_buffers)} "
                f"to {format_size(lowered)} so connections fit"
            )
            model = replace(model, shared_buffers=lowered)
    if not fits(model, reserved) and not given_work_mem and model.work_mem > SMALL_SERVER_WORK_MEM:
        lines.append(
            f"small server: work_mem lowered from {format_size(model.work_mem)} to "
            f"{format_size(SMALL_SERVER_WORK_MEM)} (give the few queries that need more their "
            "own: alter role <role> set work_mem)"
        )
        model = replace(model, work_mem=SMALL_SERVER_WORK_MEM)
    if not fits(model, reserved):
        reserved = SMALL_SERVER_SUPERUSER_RESERVED
        lines.append(
            f"small server: superuser_reserved_connections kept at PostgreSQL's {reserved}"
        )
    return model, reserved, lines


def pool_per_instance_for(usable_slots: int, instances: int) -> int:
    """Per-instance pool when ``instances`` of one application share the server directly."""
    return pool_per_instance(usable_slots - headroom_slots(usable_slots), instances)
