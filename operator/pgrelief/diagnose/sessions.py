"""Findings about what single sessions do wrong: idle in a transaction, leaked idle, queries
running too long.

These name the exact sessions (pids, oldest first) and carry the terminate and cancel
statements and the per-role timeouts that stop it happening again.
"""

from __future__ import annotations

from operator import attrgetter

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import (
    EVIDENCE_ROWS,
    PID_OF,
    addr_of,
    bucketed,
    main_applications,
    more,
    name_of,
    oldest_first,
    orm_fixes,
    roles_of,
    terminate_fix,
    version_at_least,
)
from pgrelief.diagnosis import (
    ADVICE,
    DURABLE_SQL,
    EMERGENCY_SQL,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LONG_RUNNING,
    Finding,
    Fix,
    Severity,
)
from pgrelief.durations import human_age
from pgrelief.snapshot import IDLE_IN_TRANSACTION_ABORTED as STATE_ABORTED

_USER_APP = attrgetter("usename", "application_name")
_APP_ADDR = attrgetter("application_name", "client_addr")


def idle_in_transaction(context: Context) -> list[Finding]:
    if not context.idle_in_tx:
        return []
    options = context.options
    threshold = options.idle_in_transaction_after_s
    sessions = oldest_first(context.idle_in_tx, "state_age_s")
    aborted = [s for s in sessions if s.state == STATE_ABORTED]
    open_tx = [s for s in sessions if s.state != STATE_ABORTED]
    summary = (
        f"{len(sessions)} sessions idle in transaction for ≥ {human_age(threshold)} "
        f"({len(aborted)} aborted): they hold slots, locks and back vacuum's xmin horizon"
    )
    evidence: list[str] = []
    for label, part in (("idle in transaction", open_tx), ("aborted (never rolled back)", aborted)):
        if part:
            oldest = part[0]
            xact_ages = [s.xact_age_s for s in part if s.xact_age_s is not None]
            evidence.append(
                f"{label}: {len(part)}, oldest idle {human_age(oldest.state_age_s)}"
                + (f", oldest transaction open {human_age(max(xact_ages))}" if xact_ages else "")
            )
    buckets = bucketed(sessions, _USER_APP)
    for bucket in buckets[:EVIDENCE_ROWS]:
        role, application = bucket.key
        evidence.append(
            f"user {name_of(role)}, application {name_of(application)}: {bucket.count} "
            f"({bucket.states.get(STATE_ABORTED, 0)} aborted), oldest idle "
            f"{human_age(bucket.oldest.state_age_s)}, "
            f"last query: {advice.query_sample(bucket.oldest.query)!r}"
        )
    evidence.extend(more(len(buckets), EVIDENCE_ROWS, "user/application groups"))

    fixes = [
        terminate_fix(
            sessions,
            ("idle in transaction", "idle in transaction (aborted)"),
            "state_change",
            threshold,
            "idle-in-transaction sessions",
        )
    ]
    roles = roles_of(sessions)
    role_timeout = advice.pg_duration_setting(max(threshold, 1.0))
    if roles:
        fixes.append(
            Fix(
                DURABLE_SQL,
                "-- new sessions of these roles are ended after this long idle in a transaction\n"
                + "\n".join(
                    advice.alter_role_set(role, "idle_in_transaction_session_timeout", role_timeout)
                    for role in roles
                ),
                "per-role idle_in_transaction_session_timeout",
            )
        )
    current = context.snapshot.server.setting_seconds("idle_in_transaction_session_timeout")
    server_timeout = max(threshold, 300.0)
    if current is None or current > server_timeout:
        fixes.append(
            Fix(
                DURABLE_SQL,
                (
                    "-- currently disabled (0)\n"
                    if current is None
                    else f"-- currently {human_age(current)}\n"
                )
                + advice.alter_system_set(
                    [
                        (
                            "idle_in_transaction_session_timeout",
                            advice.pg_duration_setting(server_timeout),
                        )
                    ]
                ),
                "server-wide idle_in_transaction_session_timeout (a backstop for every role)",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "In the application: commit or roll back on every path (a `with` block / "
            "try-finally around each transaction); an aborted transaction means an error was "
            "caught without a ROLLBACK. Do not hold a transaction open across network calls "
            "or user think-time.",
            "fix the cause",
        )
    )
    fixes.extend(orm_fixes(context, main_applications(sessions), "return connections promptly"))
    return [
        Finding(
            IDLE_IN_TRANSACTION,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(PID_OF, sessions)),
            tuple(fixes),
        )
    ]


def leaked_idle(context: Context) -> list[Finding]:
    if not context.leaked:
        return []
    threshold = context.options.idle_after_s
    sessions = oldest_first(context.leaked, "state_age_s")
    buckets = bucketed(sessions, _APP_ADDR)
    summary = (
        f"{len(sessions)} sessions idle for ≥ {human_age(threshold)} from {len(buckets)} "
        "application/client group(s): the pattern of leaked connections"
    )
    evidence: list[str] = []
    for bucket in buckets[:EVIDENCE_ROWS]:
        application, address = bucket.key
        users = ", ".join(name_of(role) for role in bucket.roles)
        evidence.append(
            f"application {name_of(application)} from {addr_of(address)}: {bucket.count} idle ≥ "
            f"{human_age(threshold)}, oldest idle {human_age(bucket.oldest.state_age_s)}, "
            f"user(s) {users or '(unknown)'}; last query: "
            f"{advice.query_sample(bucket.oldest.query)!r}"
        )
    evidence.extend(more(len(buckets), EVIDENCE_ROWS, "groups"))

    fixes = [terminate_fix(sessions, ("idle",), "state_change", threshold, "idle sessions")]
    keepalive_settings = [
        ("tcp_keepalives_idle", "60"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "6"),
    ]
    server_lines = advice.alter_system_set(keepalive_settings, reload=False)
    check_interval = version_at_least(context, 140000)
    if check_interval is not False:
        server_lines += (
            "\n-- PostgreSQL 14+: cancel a running query whose client went away "
            "(checked while a query runs)\n"
            + advice.alter_system_set([("client_connection_check_interval", "30s")], reload=False)
        )
    fixes.append(
        Fix(
            DURABLE_SQL,
            "-- detect dead clients (crashed hosts, dropped NAT entries) in ~2 minutes "
            "instead of the OS default of ~2 hours\n" + server_lines + "\nselect pg_reload_conf();",
            "TCP keepalives",
        )
    )
    roles = roles_of(sessions)
    if roles and version_at_least(context, 140000) is not False:
        header = (
            "-- PostgreSQL 14+ (version not observed: check first)\n"
            if version_at_least(context, 140000) is None
            else ""
        )
        fixes.append(
            Fix(
                DURABLE_SQL,
                header
                + "-- close these roles' sessions idle this long; their pools must reconnect "
                "(pre-ping/recycle, see the ORM settings)\n"
                + "\n".join(
                    advice.alter_role_set(
                        role, "idle_session_timeout", advice.pg_duration_setting(threshold)
                    )
                    for role in roles
                ),
                "per-role idle_session_timeout",
            )
        )
    fixes.append(
        Fix(
            ADVICE,
            "A connection idle this long was checked out and never returned: look for an "
            "exception path that skips close()/release(). Use try-with-resources (Java), "
            "context managers (Python `with`), ensure blocks (Ruby). Set application_name to "
            "the service name and version so the leaking code shows up here.",
            "fix the leak",
        )
    )
    applications = [str(bucket.key[0]) for bucket in buckets[:3]]
    fixes.extend(orm_fixes(context, applications, "leak detection and recycling"))
    return [
        Finding(
            LEAKED_IDLE,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(PID_OF, sessions)),
            tuple(fixes),
        )
    ]


def long_running(context: Context) -> list[Finding]:
    if not context.long_running:
        return []
    threshold = context.options.long_running_after_s
    sessions = oldest_first(context.long_running, "query_age_s")
    summary = (
        f"{len(sessions)} queries active for ≥ {human_age(threshold)}; the longest has run "
        f"{human_age(sessions[0].query_age_s)}"
    )
    evidence = []
    for session in sessions[:EVIDENCE_ROWS]:
        waiting = (
            f"waiting on {session.wait_event_type}:{session.wait_event}"
            if session.wait_event_type
            else "not waiting"
        )
        evidence.append(
            f"pid {session.pid}, user {name_of(session.usename)}, application "
            f"{name_of(session.application_name)}: running {human_age(session.query_age_s)}, "
            f"{waiting}; query: {advice.query_sample(session.query)!r}"
        )
    evidence.extend(more(len(sessions), EVIDENCE_ROWS, "queries"))
    listed = sessions[: advice.MAX_LISTED]
    fixes = [
        Fix(
            EMERGENCY_SQL,
            "-- cancel first: the query stops, the session and its slot stay; each row "
            "re-checks pid, backend_start, state and query_start\n"
            + advice.signal_sql(listed, cancel=True),
            f"cancel the {len(listed)} oldest queries",
        ),
        Fix(
            EMERGENCY_SQL,
            "-- still running a few seconds later? terminate the same sessions\n"
            + advice.signal_sql(listed),
            "then terminate what did not stop",
        ),
    ]
    roles = roles_of(sessions)
    if roles:
        fixes.append(
            Fix(
                DURABLE_SQL,
                "-- applies to the roles' new sessions; reporting roles may need longer\n"
                + "\n".join(
                    advice.alter_role_set(
                        role, "statement_timeout", advice.pg_duration_setting(threshold)
                    )
                    for role in roles
                ),
                "per-role statement_timeout",
            )
        )
    return [
        Finding(
            LONG_RUNNING,
            Severity.WARNING,
            summary,
            tuple(evidence),
            tuple(map(PID_OF, sessions)),
            tuple(fixes),
        )
    ]
