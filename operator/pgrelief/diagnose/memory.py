"""The memory finding: whether max_connections fits in the RAM given with --memory.

Only this finding needs the server's memory settings and the sizing model; it runs only
when the user states the memory, since a snapshot cannot observe it.
"""

from __future__ import annotations

from dataclasses import replace

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnosis import ADVICE, DURABLE_SQL, MEMORY_OVERCOMMIT, Finding, Fix, Severity
from pgrelief.sizing import (
    DEFAULT_AUTOVACUUM_MAX_WORKERS,
    DEFAULT_MAINTENANCE_WORK_MEM,
    DEFAULT_SHARED_BUFFERS,
    DEFAULT_TEMP_BUFFERS,
    DEFAULT_WORK_MEM,
    MB,
    RECOMMENDED_MAX_CONNECTIONS,
    MemoryModel,
    format_size,
    os_reserve,
)

MEMORY_MIN_USABLE = 10  # below this many usable slots, lowering max_connections is no fix


def memory_overcommit(context: Context) -> list[Finding]:
    memory = context.options.memory_bytes
    if memory is None:
        return []
    facts = context.snapshot.server
    assumed: list[str] = []

    def setting(name: str, default: int) -> int:
        value = facts.setting_bytes(name)
        if value is None:
            assumed.append(name)
            return default
        return value

    workers = facts.setting_int("autovacuum_max_workers")
    if workers is None:
        assumed.append("autovacuum_max_workers")
        workers = DEFAULT_AUTOVACUUM_MAX_WORKERS
    maintenance = setting("maintenance_work_mem", DEFAULT_MAINTENANCE_WORK_MEM)
    autovacuum_mem = facts.setting_bytes("autovacuum_work_mem")
    model = MemoryModel(
        shared_buffers=setting("shared_buffers", DEFAULT_SHARED_BUFFERS),
        work_mem=setting("work_mem", DEFAULT_WORK_MEM),
        temp_buffers=setting("temp_buffers", DEFAULT_TEMP_BUFFERS),
        maintenance_work_mem=autovacuum_mem if autovacuum_mem else maintenance,
        autovacuum_max_workers=workers,
    )
    max_connections = facts.max_connections
    worst = model.worst_case(max_connections)
    reserve = os_reserve(memory)
    safe = model.connections_within(memory - reserve)
    over = max_connections > safe
    if worst > memory:
        summary = (
            f"max_connections {max_connections} can use up to {format_size(worst)} in the worst "
            f"case: more than the {format_size(memory)} of RAM"
        )
    elif over:
        summary = (
            f"max_connections {max_connections} can use up to {format_size(worst)}: it leaves "
            f"less than the {format_size(reserve)} the OS and page cache need"
        )
    else:
        summary = (
            f"max_connections {max_connections} fits in {format_size(memory)}: worst case "
            f"{format_size(worst)}, up to {safe} connections would fit"
        )
    evidence = [
        "worst case = " + model.formula(max_connections),
        f"RAM {format_size(memory)} − OS/page-cache reserve {format_size(reserve)} leaves "
        f"room for ({format_size(memory - reserve)} − {format_size(model.fixed)}) / "
        f"{format_size(model.per_connection)} = {safe} connections",
        f"per-backend base {format_size(model.per_backend)} is an estimate (catalog caches, "
        "session state); a complex query can use several work_mem allocations",
    ]
    if assumed:
        evidence.append("not observed, PostgreSQL defaults assumed: " + ", ".join(assumed))
    fixes: list[Fix] = []
    minimum = facts.superuser_reserved_connections + facts.reserved_connections + MEMORY_MIN_USABLE
    if over and safe >= minimum:
        target = min(safe, RECOMMENDED_MAX_CONNECTIONS)
        note = (
            f"-- {context.client_count} client backends are connected now: put PgBouncer in front "
            "before lowering below that\n"
            if context.client_count > target
            else ""
        )
        fixes.append(
            Fix(
                DURABLE_SQL,
                note
                + advice.alter_system_set([("max_connections", str(target))], reload=False)
                + "\n-- takes effect after a restart",
                f"safe max_connections = {target}",
            )
        )
    if over and (safe < minimum or model.work_mem > DEFAULT_WORK_MEM):
        # A large work_mem is often the real overcommit: keeping max_connections and lowering
        # work_mem is the other way to fit.
        fixes.append(_work_mem_fix(model, memory - reserve, max_connections))
    if over:
        fixes.append(
            Fix(
                ADVICE,
                "Keep max_connections where memory is safe and let PgBouncer carry the "
                "application's connection count (transaction mode multiplexes thousands of "
                "clients onto a few dozen backends). `pgrelief size --ram "
                f"{format_size(memory)}` shows the full sizing.",
                "size with a pooler",
            )
        )
    return [
        Finding(
            MEMORY_OVERCOMMIT,
            Severity.WARNING if over else Severity.HEALTHY,
            summary,
            tuple(evidence),
            (),
            tuple(fixes),
        )
    ]


def _work_mem_fix(model: MemoryModel, budget: int, max_connections: int) -> Fix:
    """When memory cannot hold a useful max_connections, the per-connection cost must shrink."""
    per_connection = (budget - model.fixed) // max(max_connections, 1)
    fitting = (per_connection - model.per_backend - model.temp_buffers) // 2
    if fitting >= MB:
        value = fitting // MB
        return Fix(
            DURABLE_SQL,
            f"-- work_mem {format_size(model.work_mem)} × 2 per connection is what does not fit: "
            f"at {value}MB the {max_connections} connections fit in "
            f"{format_size(budget)}\n"
            + advice.alter_system_set([("work_mem", f"{value}MB")])
            + "\n-- for the few queries that need more: alter role <reporting role> set work_mem",
            f"lower work_mem to {value}MB",
        )
    lean = replace(model, work_mem=MB).connections_within(budget)
    return Fix(
        ADVICE,
        f"Even with work_mem at 1MB, {format_size(budget)} (RAM minus the OS reserve) holds only "
        f"{lean} connections next to shared_buffers {format_size(model.shared_buffers)} and "
        "autovacuum: "
        + (
            f"lower max_connections to {lean} and put PgBouncer in front, or add memory."
            if lean >= MEMORY_MIN_USABLE
            else "lower shared_buffers or add memory, and put PgBouncer in front."
        ),
        "memory is too small for this configuration",
    )
