"""Findings about what single sessions do wrong: idle in a transaction, leaked idle, queries
running too long.

These name the exact sessions (pids, oldest first) and carry the terminate and cancel
statements and the per-role timeouts that stop it happening again.
"""

from __future__ import annotations

from pgrelief import advice
from pgrelief.diagnose._counting import Context
from pgrelief.diagnose._shared import (
    EVIDENCE_ROWS,
    PID_OF,
    addr_of,
    buckets_of,
    listening_roles,
    main_applications,
    more,
    name_of,
    oldest_first,
    oldest_of,
    orm_fixes,
    role_timeouts,
    roles_of,
    spared_lines,
    terminate_fix,
    version_at_least,
)
from pgrelief.diagnose.locks import blocking
from pgrelief.diagnose.options import DEFAULT_OPTIONS
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
from pgrelief.snapshot import ACTIVE, FASTPATH, IDLE
from pgrelief.snapshot import IDLE_IN_TRANSACTION as STATE_IN_TRANSACTION
from pgrelief.snapshot import IDLE_IN_TRANSACTION_ABORTED as STATE_ABORTED

# The server-wide idle_in_transaction_session_timeout backstop (the domain reference's 300s).
SERVER_IDLE_IN_TRANSACTION_TIMEOUT_S = 300.0


def timeout_for(threshold_s: float, floor_s: float) -> float:
    """A timeout to configure: never below the default detection threshold (``floor_s``).

    The thresholds a report is run with are what to look at now; a timeout is what the
    role's sessions live with for good, so a short look never becomes a short timeout.
    """
    return max(threshold_s, floor_s)


def idle_in_transaction(context: Context) -> list[Finding]:
    if not context.idle_in_tx:
        return []
    options = context.options
    threshold = options.idle_in_transaction_after_s
    sessions = oldest_of(context, "idle_in_tx")
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
    buckets = buckets_of(context, "idle_in_tx")
    for bucket in buckets[:EVIDENCE_ROWS]:
        role, application = bucket.key
        evidence.append(
            f"user {name_of(role)}, application {name_of(application)}: {bucket.count} "
            f"({bucket.states.get(STATE_ABORTED, 0)} aborted), oldest idle "
            f"{human_age(bucket.oldest.state_age_s)}, "
            f"last query: {advice.query_sample(bucket.oldest.query)!r}"
        )
    evidence.extend(more(len(buckets), EVIDENCE_ROWS, "user/application groups"))
    evidence.extend(spared_lines(context, (STATE_IN_TRANSACTION, STATE_ABORTED)))

    fixes = [
        terminate_fix(
            context,
            sessions,
            dict.fromkeys((STATE_IN_TRANSACTION, STATE_ABORTED), threshold),
            "idle-in-transaction sessions",
        )
    ]
    roles = roles_of(sessions)
    if roles:
        # A timeout is what a role should live with, not the threshold this report looked
        # for: `--idle-in-transaction-after 5s` must not end every 5-second transaction.
        fixes.append(
            role_timeouts(
                roles,
                "idle_in_transaction_session_timeout",
                timeout_for(threshold, DEFAULT_OPTIONS.idle_in_transaction_after_s),
                "new sessions of these roles are ended after this long idle in a transaction",
                "per-role idle_in_transaction_session_timeout",
            )
        )
    current = context.snapshot.server.setting_seconds("idle_in_transaction_session_timeout")
    server_timeout = timeout_for(threshold, SERVER_IDLE_IN_TRANSACTION_TIMEOUT_S)
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
    fixes.extend(
        orm_fixes(context, main_applications(sessions, None), "return connections promptly")
    )
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
    sessions = oldest_of(context, "leaked")
    buckets = buckets_of(context, "leaked")
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
    evidence.extend(spared_lines(context, (IDLE,)))

    fixes = [terminate_fix(context, sessions, {IDLE: threshold}, "idle sessions")]
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
    # A LISTEN session is idle by design between notifications: a timeout would cut its role's
    # listeners off, so such roles get none (issue 10 item 17).
    listening = listening_roles(context)
    roles = [role for role in roles_of(sessions) if role not in listening]
    if roles and version_at_least(context, 140000) is not False:
        header = (
            "PostgreSQL 14+ (version not observed: check first); "
            if version_at_least(context, 140000) is None
            else ""
        )
        skipped = sorted(listening & set(roles_of(sessions)))
        fix = role_timeouts(
            roles,
            "idle_session_timeout",
            timeout_for(threshold, DEFAULT_OPTIONS.idle_after_s),
            header + "close these roles' sessions idle this long; their pools must reconnect "
            "(pre-ping/recycle, see the ORM settings)"
            + (
                f"\n-- not for {', '.join(name_of(r) for r in skipped)}: its sessions LISTEN, "
                "and a listener is idle by design"
                if skipped
                else ""
            ),
            "per-role idle_session_timeout",
        )
        fixes.append(fix)
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
    applications = list(dict.fromkeys(str(bucket.key[0]) for bucket in buckets))
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
    # Sessions waiting on a lock whose holder is known are its victims: the lock_blocker
    # finding ends the holder; cancelling them would only send them back into the queue.
    victims = blocking(context).victims
    victimised = [s for s in sessions if s.pid in victims]
    sessions = [s for s in sessions if s.pid not in victims] if victimised else sessions
    if not sessions:
        return []  # all of them wait on a lock: the lock_blocker finding names the holder
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
    evidence.extend(spared_lines(context, (ACTIVE, FASTPATH)))
    if victimised:
        evidence.append(
            f"{len(victimised)} more wait on a lock another session holds (pids "
            f"{', '.join(str(s.pid) for s in victimised[:EVIDENCE_ROWS])}"
            + (" ..." if len(victimised) > EVIDENCE_ROWS else "")
            + "): not cancelled here; see the lock_blocker finding"
        )
    spare = context.unknown_superusers
    listed = sessions[: advice.MAX_LISTED]
    fixes = [
        Fix(
            EMERGENCY_SQL,
            "-- cancel first: the query stops, the session and its slot stay; each row "
            "re-checks pid, backend_start, state and query_start\n"
            + advice.signal_sql(listed, cancel=True, spare_superusers=spare),
            f"cancel the {len(listed)} oldest queries",
        ),
        Fix(
            EMERGENCY_SQL,
            "-- still running a few seconds later? terminate the same sessions\n"
            + advice.signal_sql(listed, spare_superusers=spare),
            "then terminate what did not stop",
        ),
    ]
    roles = roles_of(sessions)
    if roles:
        fixes.append(
            role_timeouts(
                roles,
                "statement_timeout",
                timeout_for(threshold, DEFAULT_OPTIONS.long_running_after_s),
                "applies to the roles' new sessions; reporting roles may need longer",
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
