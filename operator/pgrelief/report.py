"""Renders a Diagnosis for people (rich tables) and for programs (the JSON contract).

The text report is what someone reads at 3 a.m. during an outage: the verdict first, the slot
arithmetic, where the slots went, then each finding with its evidence and the exact SQL or
configuration to apply. The JSON is ``Diagnosis.to_json`` unchanged, so both outputs always
agree.
"""

from __future__ import annotations

import json
from typing import IO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from pgrelief.diagnosis import (
    DURABLE_SQL,
    EMERGENCY_SQL,
    ORM,
    PGBOUNCER,
    Diagnosis,
    Finding,
    Severity,
)
from pgrelief.diagnosis import Group as BreakdownGroup
from pgrelief.durations import human_age
from pgrelief.sizing import ServerSizing
from pgrelief.snapshot import ACTIVE, IDLE, IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED

_STYLE = {
    Severity.HEALTHY: "bold cyan",
    Severity.WARNING: "bold yellow",
    Severity.CRITICAL: "bold red",
    Severity.UNKNOWN: "bold magenta",
}
_STATE_COLUMNS = (
    (ACTIVE, "active"),
    (IDLE, "idle"),
    (IDLE_IN_TRANSACTION, "idle in tx"),
    (IDLE_IN_TRANSACTION_ABORTED, "aborted tx"),
)
_BREAKDOWN_ROWS = 10
_CODE_FIXES = frozenset({EMERGENCY_SQL, DURABLE_SQL, PGBOUNCER, ORM})
_PIDS_SHOWN = 20


def render_json(diagnosis: Diagnosis, stream: IO[str]) -> None:
    json.dump(diagnosis.to_json(), stream, indent=2, sort_keys=False)
    stream.write("\n")


def render_text(diagnosis: Diagnosis, stream: IO[str], *, width: int | None = None) -> None:
    console = Console(file=stream, width=width or 120, highlight=False, soft_wrap=False)
    console.print(_verdict(diagnosis))
    if diagnosis.server is not None:
        console.print(_breakdown_tables(diagnosis))
    if not diagnosis.findings:
        console.print(Text("No findings: connection usage looks healthy.", style="green"))
    for number, finding in enumerate(diagnosis.findings, start=1):
        _print_finding(console, number, finding)


def _verdict(diagnosis: Diagnosis) -> Text:
    text = Text()
    text.append("pgrelief diagnosis: ", style="bold")
    text.append(diagnosis.status.label.upper(), style=_STYLE[diagnosis.status])
    text.append(f"   (source: {diagnosis.source}")
    if diagnosis.taken_at:
        text.append(f", at {diagnosis.taken_at}")
    text.append(")\n")
    for note in diagnosis.notes:
        text.append(f"note: {note}\n", style="bold yellow")
    server = diagnosis.server
    if server is None:
        text.append("The server refused our connection: no slot was free to look inside.\n")
        return text
    version = _version_text(server.version_num)
    totals = diagnosis.totals
    text.append(
        f"{version}max_connections={server.max_connections} "
        f"superuser_reserved_connections={server.superuser_reserved_connections} "
        f"reserved_connections={server.reserved_connections} "
        f"-> usable slots {server.usable_slots}\n"
    )
    text.append(
        f"client backends {totals.client_backends}/{server.usable_slots} "
        f"= {totals.utilization_percent:.1f}% used"
        f" (plus {totals.other_backends} non-client backends)\n"
    )
    if server.assumed:
        text.append(
            "assumed PostgreSQL defaults for: "
            + ", ".join(server.assumed)
            + " (pass --settings-file to use the server's values)\n",
            style="yellow",
        )
    states = ", ".join(f"{state}: {count}" for state, count in totals.by_state.items())
    text.append(f"by state: {states or 'no client sessions'}\n")
    return text


def _version_text(version_num: int | None) -> str:
    if not version_num:
        return ""
    return f"PostgreSQL {version_num // 10000}.{version_num % 10000}  "


def _breakdown_tables(diagnosis: Diagnosis) -> Group:
    breakdown = diagnosis.breakdown
    return Group(
        _group_table("By user", breakdown.by_user),
        _group_table("By application", breakdown.by_application),
        _group_table("By client address", breakdown.by_client_addr),
        _group_table("By database", breakdown.by_database),
    )


def _group_table(title: str, groups: tuple[BreakdownGroup, ...]) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("key")
    table.add_column("total", justify="right")
    for _, header in _STATE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("other", justify="right")
    table.add_column("oldest in state", justify="right")
    for group in groups[:_BREAKDOWN_ROWS]:
        known = sum(group.by_state.get(state, 0) for state, _ in _STATE_COLUMNS)
        table.add_row(
            group.key if group.key else "(none)",
            str(group.count),
            *(str(group.by_state.get(state, 0)) for state, _ in _STATE_COLUMNS),
            str(group.count - known),
            human_age(group.oldest_state_age_s),
        )
    if len(groups) > _BREAKDOWN_ROWS:
        rest = groups[_BREAKDOWN_ROWS:]
        table.add_row(f"... {len(rest)} more", str(sum(g.count for g in rest)))
    return table


def _print_finding(console: Console, number: int, finding: Finding) -> None:
    # Findings are printed flat, not in panels: the SQL and ini text must survive copy and
    # paste, so it is never wrapped or boxed (the terminal wraps long lines visually only).
    title = Text()
    title.append(
        f"{number}. [{finding.severity.finding_label.upper()}] ", style=_STYLE[finding.severity]
    )
    title.append(f"{finding.kind}: ", style="bold")
    title.append(finding.summary)
    console.rule(style="dim")
    console.print(title)
    for line in finding.evidence:
        console.print(Text(f"  • {line}"))
    if finding.pids:
        shown = ", ".join(str(pid) for pid in finding.pids[:_PIDS_SHOWN])
        more = len(finding.pids) - _PIDS_SHOWN
        console.print(Text(f"  pids: {shown}" + (f" (+{more} more)" if more > 0 else "")))
    for fix in finding.fixes:
        console.print(Text(f"\n  {fix.title or fix.kind}:", style="bold cyan"))
        style = "green" if fix.kind in _CODE_FIXES else ""
        console.print(Text(fix.text, style=style), soft_wrap=True)


def render_sizing(sizing: ServerSizing, stream: IO[str], output_format: str = "text") -> None:
    """``pgrelief size``: the numbers, the reasoning behind each, and the SQL to apply them."""
    pool = sizing.pgbouncer
    numbers = {
        "max_connections": sizing.max_connections,
        "superuser_reserved_connections": sizing.superuser_reserved_connections,
        "usable_slots": sizing.usable_slots,
        "memory_ceiling_connections": sizing.memory_ceiling,
        "pgbouncer": {
            "default_pool_size": pool.default_pool_size,
            "reserve_pool_size": pool.reserve_pool_size,
            "max_client_conn": pool.max_client_conn,
            "max_db_connections": pool.max_db_connections,
            "replicas": pool.replicas,
        },
        "pool_per_instance_direct": sizing.pool_per_instance_direct,
        "needs_pgbouncer": sizing.needs_pgbouncer,
        "reasoning": list(sizing.reasoning),
        "sql": sizing.settings_sql(),
    }
    if output_format == "json":
        json.dump(numbers, stream, indent=2)
        stream.write("\n")
        return
    console = Console(file=stream, width=120, highlight=False)
    table = Table(title="pgrelief size", title_justify="left")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key in ("max_connections", "superuser_reserved_connections", "usable_slots"):
        table.add_row(key, str(numbers[key]))
    for key in ("default_pool_size", "reserve_pool_size", "max_client_conn", "max_db_connections"):
        table.add_row(f"pgbouncer {key}", str(getattr(pool, key)))
    if sizing.pool_per_instance_direct is not None:
        table.add_row("ORM pool per instance (direct)", str(sizing.pool_per_instance_direct))
    console.print(table)
    for line in sizing.reasoning:
        console.print(Text(f"• {line}"))
    console.print(Text("\n" + sizing.settings_sql(), style="green"), soft_wrap=True)
