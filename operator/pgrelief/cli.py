"""The ``pgrelief`` command line: thin wiring from flags to the pipeline.

Every command parses its flags, calls observe/diagnose/plan/act, and renders. The exit codes
are a contract for scripts and monitoring (0 healthy, 1 warning, 2 critical, 3 unknown/error),
so click's own usage-error code (2, which would read as "critical") is mapped to 3, and every
error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import click

from pgrelief import __version__
from pgrelief.advice import STACKS
from pgrelief.crd import crd_yaml
from pgrelief.diagnose import DiagnoseOptions, OptionsError, diagnose_refusal
from pgrelief.diagnose import diagnose as run_diagnosis
from pgrelief.diagnosis import Diagnosis, Severity
from pgrelief.dumps import load_input
from pgrelief.durations import DurationError, parse_duration
from pgrelief.errors import PgreliefError, ServerRefused
from pgrelief.observe import connect, take_snapshot
from pgrelief.report import render_json, render_sizing, render_text
from pgrelief.runner import run_standalone
from pgrelief.sizing import SizeError, parse_size, size_server
from pgrelief.snapshot import given_max_connections
from pgrelief.triage import diagnose_offline
from pgrelief.web import DEFAULT_PORT, serve

EXIT_ERROR = int(Severity.UNKNOWN)


def _duration_option(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except DurationError as error:
        raise click.BadParameter(str(error), param_hint=flag) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgrelief")
def cli() -> None:
    """pgrelief: find and free what is eating PostgreSQL connection slots."""


@cli.command()
@click.option(
    "--dsn",
    help='libpq connection string or URI of the server to inspect ("" = the PG* environment).',
)
@click.option(
    "--activity-file",
    type=click.Path(path_type=Path),
    help="pg_stat_activity as pasted, '-' for stdin: psql's aligned or \\x output, CSV with "
    "a header, or JSON; or the output of the three triage queries (a partial diagnosis). "
    "SHOW ALL / pg_settings may follow in the same paste.",
)
@click.option(
    "--settings-file",
    type=click.Path(path_type=Path),
    help="pg_settings or SHOW ALL output (any of those formats) to go with --activity-file.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, None),
    help="The server's max_connections, for an --activity-file without --settings-file "
    "(otherwise PostgreSQL's default 100 is assumed, and the report says so); overrides the "
    "settings file.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: the verdict, the statement to run now and the durable fixes; json: the full "
    "diagnosis (the contract scripts and monitoring read).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Text report in full: breakdown tables, and every finding with its evidence and "
    "statements (the diagnostic queries, pgbouncer.ini, ORM pool settings).",
)
@click.option(
    "--idle-after",
    help="Idle this long counts as a leaked session (default 30m). Only what to look at: "
    "the advised idle_session_timeout is never shorter than the default.",
)
@click.option(
    "--idle-in-transaction-after",
    help="Idle in transaction this long is reported (default 60s); the advised timeouts are "
    "never shorter than the default.",
)
@click.option("--long-running-after", help="Active this long is a long-running query (5m).")
@click.option("--memory", help="Server RAM (e.g. 16GB) to check max_connections against.")
@click.option("--stack", type=click.Choice(STACKS), help="Force the ORM advice for this stack.")
@click.option(
    "--warning-percent",
    type=click.IntRange(1, 100),
    default=70,
    show_default=True,
    help="Share of usable slots in use that is a warning (exit 1).",
)
@click.option(
    "--critical-percent",
    type=click.IntRange(1, 100),
    default=90,
    show_default=True,
    help="Share of usable slots in use that is critical (exit 2).",
)
def diagnose(
    dsn: str | None,
    activity_file: Path | None,
    settings_file: Path | None,
    max_connections: int | None,
    output_format: str,
    verbose: bool,
    idle_after: str | None,
    idle_in_transaction_after: str | None,
    long_running_after: str | None,
    memory: str | None,
    stack: str | None,
    warning_percent: int,
    critical_percent: int,
) -> None:
    """Explain what is using the connection slots, with evidence and fixes.

    \b
    Live:    pgrelief diagnose --dsn 'host=db user=postgres'
    Pasted:  psql -X -c 'select now(), * from pg_stat_activity' -c 'show all' \\
               | pgrelief diagnose --activity-file -

    The report leads with the verdict (what holds the slots, who, since when), the one
    statement that frees them and the durable fixes; --verbose shows everything. Sessions
    `pgrelief run` protects by default (superusers, LISTEN sessions, its own) are never in
    its statements.

    The output of the seed's three triage queries (connections by state; by usename,
    application_name and state; the 20 oldest idle sessions with now() - state_change as
    idle_duration) gives a partial diagnosis that says what needs the full dump.

    Exit status: 0 healthy, 1 warning, 2 critical, 3 unknown or error.
    """

    if (dsn is None) == (activity_file is None):
        raise click.UsageError("give exactly one of --dsn or --activity-file")
    if settings_file is not None and activity_file is None:
        raise click.UsageError("--settings-file goes with --activity-file")
    if max_connections is not None and activity_file is None:
        raise click.UsageError(
            "--max-connections goes with --activity-file (a live server reports its own)"
        )
    if warning_percent >= critical_percent:
        raise click.UsageError("--warning-percent must be below --critical-percent")
    try:
        memory_bytes = parse_size(memory) if memory else None
    except SizeError as error:
        raise click.BadParameter(str(error), param_hint="--memory") from None
    defaults = DiagnoseOptions()
    idle = _duration_option(idle_after, "--idle-after")
    idle_in_transaction = _duration_option(idle_in_transaction_after, "--idle-in-transaction-after")
    long_running = _duration_option(long_running_after, "--long-running-after")
    try:
        options = DiagnoseOptions(
            idle_after_s=defaults.idle_after_s if idle is None else idle,
            idle_in_transaction_after_s=(
                defaults.idle_in_transaction_after_s
                if idle_in_transaction is None
                else idle_in_transaction
            ),
            long_running_after_s=(
                defaults.long_running_after_s if long_running is None else long_running
            ),
            warning_percent=warning_percent,
            critical_percent=critical_percent,
            memory_bytes=memory_bytes,
            stack=stack,
        )
    except OptionsError as error:
        raise click.UsageError(str(error)) from None
    diagnosis = (
        _diagnose_live(dsn, options)
        if dsn is not None
        else _diagnose_files(activity_file, settings_file, options, max_connections)
    )
    _render(diagnosis, output_format, verbose=verbose)
    sys.exit(int(diagnosis.status))


def _diagnose_live(dsn: str, options: DiagnoseOptions) -> Diagnosis:

    try:
        with connect(dsn) as conn:
            snapshot = take_snapshot(conn)
    except ServerRefused as refused:
        return diagnose_refusal(str(refused))
    return run_diagnosis(snapshot, options)


def _diagnose_files(
    activity_file: Path | None,
    settings_file: Path | None,
    options: DiagnoseOptions,
    max_connections: int | None = None,
) -> Diagnosis:

    assert activity_file is not None
    loaded = load_input(activity_file, settings_file)
    found = loaded.found
    if max_connections is not None:
        found = replace(found, server=given_max_connections(found.server, max_connections))
    return diagnose_offline(found, options, loaded.notes)


def _render(diagnosis: Diagnosis, output_format: str, *, verbose: bool = False) -> None:

    if output_format == "json":
        render_json(diagnosis, sys.stdout)
    else:
        render_text(diagnosis, sys.stdout, verbose=verbose)


@cli.command()
@click.option(
    "--policy",
    "policy_file",
    required=True,
    type=click.Path(path_type=Path),
    help="ConnectionPolicy YAML, the same file you would kubectl apply.",
)
@click.option("--dsn", help="Server to act on; overrides spec.postgres.")
@click.option("--once", is_flag=True, help="Run one cycle and exit.")
@click.option("--dry-run", is_flag=True, help="Change nothing; report what would be done.")
@click.option(
    "--audit-file", type=click.Path(path_type=Path), help="Append JSON-line audit records."
)
@click.option(
    "--state-file",
    type=click.Path(path_type=Path),
    help="Where recent terminations and original values are kept between runs.",
)
@click.option("--revert", is_flag=True, help="Restore the values found before pgrelief's changes.")
def run(
    policy_file: Path,
    dsn: str | None,
    once: bool,
    dry_run: bool,
    audit_file: Path | None,
    state_file: Path | None,
    revert: bool,
) -> None:
    """Diagnose and remediate in a loop, within the policy's limits, without Kubernetes.

    Exit status: 0 done (or stopped by SIGTERM/SIGINT), 1 a --once or --revert cycle had
    failed actions, 3 error (nothing is done when the audit file or state file cannot be
    written; a run that cannot write them mid-way stops and says what was done).
    """

    status = run_standalone(
        policy_file,
        dsn=dsn,
        once=once,
        dry_run=dry_run,
        audit_file=audit_file,
        state_file=state_file,
        revert=revert,
    )
    sys.exit(status)


def _size_option(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except SizeError as error:
        raise click.BadParameter(str(error), param_hint=flag) from None


@cli.command()
@click.option("--ram", required=True, help="Server memory, e.g. 16GB.")
@click.option("--shared-buffers", help="shared_buffers (default: 25% of RAM).")
@click.option("--work-mem", help="work_mem (default 4MB).")
@click.option("--per-backend", help="Base memory of one backend (default 10MB).")
@click.option("--app-instances", type=int, help="Application instances connecting.")
@click.option("--pool-per-instance", type=int, help="Their ORM pool size each.")
@click.option(
    "--pgbouncer-replicas",
    type=int,
    default=1,
    show_default=True,
    help="PgBouncer instances sharing the server's slots (the pools are split between them).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: a table with the reasoning and the SQL; json: the same numbers for scripts.",
)
def size(
    ram: str,
    shared_buffers: str | None,
    work_mem: str | None,
    per_backend: str | None,
    app_instances: int | None,
    pool_per_instance: int | None,
    pgbouncer_replicas: int,
    output_format: str,
) -> None:
    """Compute a safe max_connections and pool sizes for a server's memory.

    A small server gets advice too: when the memory cannot hold a useful max_connections
    with the defaults, shared_buffers and work_mem are lowered (and said so) before giving up.
    """
    optional: dict[str, int] = {}
    for key, value, flag in (
        ("work_mem", work_mem, "--work-mem"),
        ("per_backend", per_backend, "--per-backend"),
    ):
        parsed = _size_option(value, flag)
        if parsed is not None:
            optional[key] = parsed
    try:
        sizing = size_server(
            _size_option(ram, "--ram") or 0,
            shared_buffers=_size_option(shared_buffers, "--shared-buffers"),
            app_instances=app_instances,
            pool_per_instance=pool_per_instance,
            pgbouncer_replicas=pgbouncer_replicas,
            **optional,
        )
    except SizeError as error:
        raise click.UsageError(str(error)) from None
    render_sizing(sizing, sys.stdout, output_format)


@cli.command("operator")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch ConnectionPolicies in this namespace (repeatable; globs like team-*).",
)
@click.option("--all-namespaces", is_flag=True, help="Watch every namespace.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics.")
@click.option(
    "--liveness",
    metavar="URL",
    help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option("--standalone", is_flag=True, help="No peering: for exactly one replica.")
@click.option("--priority", type=int, help="Peering priority (default: random per process).")
@click.option(
    "--peering",
    "peering_name",
    default="pgrelief",
    show_default=True,
    help="Name of the kopf peering object the replicas coordinate through.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or as one JSON object each.",
)
@click.option(
    "--audit-file",
    type=click.Path(path_type=Path),
    help="Also append audit records here (they always go to stdout, one JSON line each).",
)
@click.option(
    "--workers", type=click.IntRange(1, 512), default=16, show_default=True,
    help="Threads that run cycles (sync PostgreSQL and API calls).",
)  # fmt: skip
@click.option(
    "--instance",
    default=lambda: os.environ.get("POD_NAME") or socket.gethostname(),
    help="Name this process reports in Events (default: $POD_NAME or the host name).",
)
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator_command(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    metrics_port: int | None,
    liveness: str | None,
    standalone: bool,
    priority: int | None,
    peering_name: str,
    log_format: str,
    audit_file: Path | None,
    workers: int,
    instance: str,
    verbose: bool,
) -> None:
    """Run the Kubernetes operator for ConnectionPolicy objects (KUBECONFIG or in-cluster)."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace NS (one or more) or --all-namespaces")
    from pgrelief.controller.main import run_operator  # noqa: PLC0415 - kopf only when needed

    run_operator(
        namespaces=namespaces,
        all_namespaces=all_namespaces,
        metrics_port=metrics_port,
        liveness=liveness,
        standalone=standalone,
        priority=priority,
        peering_name=peering_name,
        log_format=log_format,
        audit_file=audit_file,
        workers=workers,
        instance=instance,
        verbose=verbose,
    )


@cli.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free port; the URL is printed).",
)
def web(port: int) -> None:
    """Serve a page on this machine to paste pg_stat_activity into.

    The page takes what diagnose --activity-file takes (psql's output, CSV, JSON, the triage
    queries; pasted or dropped as a file) and shows the same report: the verdict, the
    emergency SQL with copy buttons, a chart of connections by state and by application.
    It listens on 127.0.0.1 only and loads nothing from anywhere else.
    """
    try:
        serve(port)
    except OSError as error:
        raise click.UsageError(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None


@cli.command()
def crd() -> None:
    """Print the ConnectionPolicy CRD generated from the policy model."""

    click.echo(crd_yaml(), nl=False)


def _fail(message: str) -> NoReturn:
    click.echo(f"pgrelief: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI with the exit-code contract enforced."""
    try:
        cli.main(args=argv, prog_name="pgrelief", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as error:
        _fail(error.format_message())
    except PgreliefError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted")
    except Exception as error:  # the one-line promise holds even for our own bugs
        if os.environ.get("PGRELIEF_DEBUG"):
            raise
        _fail(f"internal error: {type(error).__name__}: {error} (set PGRELIEF_DEBUG=1 for details)")
    sys.exit(0)
