"""Renders a Diagnosis for people (rich tables) and for programs (the JSON contract).

The text report is what someone reads at 3 a.m. during an outage: the verdict first (what
holds the slots, who, since when), the one statement that frees them, the durable fixes, and
the findings in one line each; ``--verbose`` adds the breakdown tables and every finding with
its evidence and statements. Every name in it comes from the server, so control characters
are made visible before anything reaches the terminal. The JSON is ``Diagnosis.to_json``
unchanged, so both outputs always agree.
"""

from __future__ import annotations

import json
from typing import IO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from pgrelief.advice import escape_controls
from pgrelief.diagnosis import (
    DURABLE_SQL,
    EMERGENCY_SQL,
    ORM,
    PGBOUNCER,
    Diagnosis,
    Finding,
    Fix,
    Severity,
    Verdict,
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
_BRIEF_UNLESS_VERBOSE = frozenset({PGBOUNCER, ORM})  # long texts: their title alone
_PIDS_SHOWN = 20


def render_json(diagnosis: Diagnosis, stream: IO[str]) -> None:
    json.dump(diagnosis.to_json(), stream, indent=2, sort_keys=False)
    stream.write("\n")


def render_text(
    diagnosis: Diagnosis, stream: IO[str], *, width: int | None = None, verbose: bool = False
) -> None:
    """The report: the verdict, the one statement to run now, the durable fixes, the findings
    in one line each; ``verbose`` adds the breakdown tables and every finding in full."""
    console = Console(file=stream, width=width or 120, highlight=False, soft_wrap=False)
    console.print(_header(diagnosis))
    verdict = diagnosis.verdict
    if verdict is not None:
        _print_verdict(console, diagnosis, verdict, verbose)
    if not diagnosis.findings:
        console.print(Text("No findings: connection usage looks healthy.", style="green"))
    elif verdict is not None and not verbose:
        _print_finding_lines(console, diagnosis)
        return
    # --verbose, or a diagnosis without a verdict (a partial one from the triage queries).
    if diagnosis.server is not None:
        console.print(_breakdown_tables(diagnosis))
    for number, finding in enumerate(diagnosis.findings, start=1):
        _print_finding(console, number, finding)


def _safe(text: str, style: str = "") -> Text:
    """Text for the terminal with every control character but the line feed made visible:
    names come from the server and must not clear screens or retitle windows (the fix texts
    quote names as SQL escapes already; this catches whatever else would reach the terminal)."""
    return Text(escape_controls(text, keep_newlines=True), style=style)


def _header(diagnosis: Diagnosis) -> Text:
    text = Text()
    text.append("pgrelief diagnosis: ", style="bold")
    text.append(diagnosis.status.label.upper(), style=_STYLE[diagnosis.status])
    verdict = diagnosis.verdict
    if verdict is not None and verdict.assumed:
        text.append(" (on assumed settings)", style="bold yellow")
    text.append(escape_controls(f"   (source: {diagnosis.source}"))  # a file name
    if diagnosis.taken_at:
        text.append(f", at {diagnosis.taken_at}")
    text.append(")")
    for note in diagnosis.notes:
        text.append("\n" + escape_controls(f"note: {note}"), style="bold yellow")
    if verdict is not None:
        for note in verdict.notes:
            if note.startswith("ASSUMED"):
                text.append("\n" + escape_controls(note), style="bold yellow")
    if diagnosis.server is None:
        text.append("\nThe server refused our connection: no slot was free to look inside.")
    elif verdict is None:
        text.append("\n" + _slot_facts(diagnosis))
    return text


def _slot_facts(diagnosis: Diagnosis) -> str:
    """The slot arithmetic and the state counts, one line."""
    server = diagnosis.server
    assert server is not None
    totals = diagnosis.totals
    states = ", ".join(f"{state} {count}" for state, count in totals.by_state.items())
    line = (
        f"{_version_text(server.version_num)}max_connections {server.max_connections} − "
        f"superuser_reserved_connections {server.superuser_reserved_connections} − "
        f"reserved_connections {server.reserved_connections} = {server.usable_slots} usable "
        f"slots; by state: {states or 'no client sessions'}"
    )
    if totals.other_backends:
        line += f"; {totals.other_backends} non-client backends (not counted)"
    if server.assumed:
        line += "; assumed PostgreSQL defaults for: " + ", ".join(server.assumed)
    return line


def _print_verdict(console: Console, diagnosis: Diagnosis, verdict: Verdict, verbose: bool) -> None:
    first, *rest = verdict.summary
    console.print(_safe(first, "bold"))
    for line in rest:
        console.print(_safe(f"  • {line}"))
    if diagnosis.server is not None:
        console.print(_safe(f"  • {_slot_facts(diagnosis)}", "dim"))
    if verdict.emergency is not None:
        console.print(_safe(f"\n{_emergency_heading(diagnosis, verdict.emergency)}:", "bold red"))
        console.print(_safe(verdict.emergency.text, "green"), soft_wrap=True)
    notes = [note for note in verdict.notes if not note.startswith("ASSUMED")]
    if notes:
        console.print()
        for note in notes:
            console.print(_safe(f"  ! {note}", "yellow"))
    if not verdict.durable:
        return
    console.print(_safe("\nStop it happening again:", "bold cyan"))
    for number, fix in enumerate(verdict.durable, start=1):
        if fix.kind in _BRIEF_UNLESS_VERBOSE and not verbose:
            console.print(_safe(f"  {number}. {fix.title or fix.kind} (the text: --verbose)"))
            continue
        console.print(_safe(f"  {number}. {fix.title or fix.kind}:"))
        console.print(_safe(fix.text, "green"), soft_wrap=True)


def _emergency_heading(diagnosis: Diagnosis, fix: Fix) -> str:
    server = diagnosis.server
    reserved = (
        f"{server.superuser_reserved_connections} slots are reserved for superusers"
        if server is not None
        else "superusers have reserved slots"
    )
    title = fix.title or "free slots now"
    return f"{title[0].upper()}{title[1:]}: paste into psql as a superuser ({reserved})"


def _print_finding_lines(console: Console, diagnosis: Diagnosis) -> None:
    console.print(
        _safe(
            "\nFindings (evidence, breakdowns and every statement: --verbose, or --format json):",
            "bold",
        )
    )
    for finding in diagnosis.findings:
        line = Text("  ")
        line.append(f"{finding.severity.finding_label.upper():<8} ", style=_STYLE[finding.severity])
        line.append(f"{finding.kind}: ", style="bold")
        line.append(escape_controls(finding.summary))
        console.print(line)


def _version_text(version_num: int | None) -> str:
    if not version_num:
        return ""
    return f"PostgreSQL {version_num // 10000}.{version_num % 10000}: "


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
            escape_controls(group.key) if group.key else "(none)",
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
    title.append(escape_controls(finding.summary))
    console.rule(style="dim")
    console.print(title)
    for line in finding.evidence:
        console.print(_safe(f"  • {line}"))
    if finding.pids:
        shown = ", ".join(str(pid) for pid in finding.pids[:_PIDS_SHOWN])
        more = len(finding.pids) - _PIDS_SHOWN
        console.print(Text(f"  pids: {shown}" + (f" (+{more} more)" if more > 0 else "")))
    for fix in finding.fixes:
        console.print(_safe(f"\n  {fix.title or fix.kind}:", "bold cyan"))
        style = "green" if fix.kind in _CODE_FIXES else ""
        console.print(_safe(fix.text, style), soft_wrap=True)


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
