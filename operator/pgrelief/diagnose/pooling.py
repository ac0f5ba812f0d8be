"""The pooler finding and the pgbouncer.ini fix that the pooler and spike findings share.

Many idle connections and few active ones are what PgBouncer shares; the fix is sized from
usable slots and picks transaction or session mode from the session features the sessions'
last statements show.
"""

from __future__ import annotations

import math

from pgrelief import advice
from pgrelief.diagnose._counting import ADDR, APP, DB, Context
from pgrelief.diagnose._shared import name_of, state_split
from pgrelief.diagnosis import ADVICE, NO_POOLER, PGBOUNCER, Finding, Fix, Severity
from pgrelief.sizing import headroom_slots, pgbouncer_pool_sizes
from pgrelief.snapshot import ACTIVE, FASTPATH, Session

# Tuning of the heuristics (documented in the findings' evidence when they fire).
NO_POOLER_MIN = 20
NO_POOLER_FLOOR = 10
NO_POOLER_SLOTS_SHARE = 0.3
NO_POOLER_ACTIVE_RATIO = 0.2
DEFAULT_PORT = 5432  # when the input did not say which port the server listens on
_POOLER_NAMES = ("pgbouncer", "pgpool", "odyssey", "pgcat", "supavisor", "pgdog")


def no_pooler(context: Context) -> list[Finding]:
    total = context.candidates_total
    threshold = max(
        NO_POOLER_FLOOR, min(NO_POOLER_MIN, math.ceil(context.usable * NO_POOLER_SLOTS_SHARE))
    )
    active = len(context.active)
    if total < threshold or active >= total * NO_POOLER_ACTIVE_RATIO:
        return []
    app_counts = context.counts_excluding_own(APP)
    pooled = sum(
        n for app, n in app_counts.items() if app and any(p in app.lower() for p in _POOLER_NAMES)
    )
    if pooled * 2 >= total:
        return []  # a pooler is already in front; its own pool sizing is another question
    idle = sum(n for state, n in context.by_state.items() if state not in (ACTIVE, FASTPATH))
    summary = (
        f"{total} client connections but only {active} active ({active * 100 // total}%): "
        "idle connections a pooler (PgBouncer) would share"
    )
    addresses = len(context.distinct(ADDR))
    evidence = [
        f"{total} client backends ≥ {threshold} and active ratio {active}/{total} < "
        f"{int(NO_POOLER_ACTIVE_RATIO * 100)}%",
        f"by state: {state_split(context.by_state)} ({idle} not running a query)",
        f"from {addresses} client address(es) and {len(app_counts)} application name(s)",
    ]
    fix = pgbouncer_fix(context, "put PgBouncer in front of the applications")
    evidence.extend(_session_feature_lines(context))
    severity = Severity.WARNING if context.pressure >= Severity.WARNING else Severity.HEALTHY
    return [
        Finding(
            NO_POOLER,
            severity,
            summary,
            tuple(evidence),
            (),
            (
                fix,
                Fix(
                    ADVICE,
                    "Point the applications at PgBouncer (port 6432) and keep admins, "
                    "migrations and pgrelief on direct connections. In transaction mode use SET "
                    "LOCAL instead of SET, and PgBouncer 1.21+ max_prepared_statements for "
                    "protocol-level prepared statements; applications listed as needing "
                    "session features use the *_session entry or connect directly.",
                    "switch the applications over",
                ),
            ),
        )
    ]


def _session_features(context: Context) -> dict[str, dict[str, list[Session]]]:
    """Applications whose sessions' last statements show session-level features."""
    key = "session_features"
    if key in context.cache:
        cached: dict[str, dict[str, list[Session]]] = context.cache[key]
        return cached
    found: dict[str, dict[str, list[Session]]] = {}
    seen: dict[str, str | None] = {}  # many sessions run the same statement text
    feature_of = advice.session_feature
    own = context.own
    for session in context.clients:
        query = session.query
        if query in seen:
            feature = seen[query]
        else:
            feature = seen[query] = feature_of(query)
        if feature is not None and session is not own:
            found.setdefault(session.application_name, {}).setdefault(feature, []).append(session)
    context.cache[key] = found
    return found


def _session_feature_lines(context: Context) -> list[str]:
    features = _session_features(context)
    lines = []
    for application, by_feature in sorted(features.items()):
        parts = ", ".join(
            f"{feature} ({len(s)} sessions)" for feature, s in sorted(by_feature.items())
        )
        lines.append(
            f"application {name_of(application)} needs session mode or a direct connection: "
            f"last statements show {parts}"
        )
    return lines


def pgbouncer_fix(context: Context, title: str) -> Fix:
    """A pgbouncer.ini sized from usable slots, pool mode chosen from the session features seen."""
    features = _session_features(context)
    session_apps = set(features)
    applications = context.distinct(APP)
    all_session = bool(applications) and applications <= session_apps
    pool_mode = "session" if all_session else "transaction"
    pools = {
        (database, user)
        for database, user, application in context.triples()
        if application not in session_apps
    }
    databases = sorted({d or "" for d in context.distinct(DB)} - {""}) or ["mydb"]
    session_pools: dict[str, int] = {}
    if not all_session:
        for by_feature in features.values():
            for members in by_feature.values():
                for session in members:
                    if session.datname:
                        session_pools[session.datname] = session_pools.get(session.datname, 0) + 1
    session_slots = sum(session_pools.values())
    sizes = pgbouncer_pool_sizes(
        context.usable,
        1,
        pools=max(len(pools), 1),
        databases=len(databases),
        client_connections=context.candidates_total,
        direct_slots=headroom_slots(context.usable) + session_slots,
    )
    notes = list(sizes.reasoning)
    if all_session:
        notes.append(
            "session mode: every application's last statements show session features "
            "(LISTEN, advisory locks, PREPARE, SET, temp tables); move them to transaction-safe "
            "code to multiplex"
        )
    elif session_apps:
        names = ", ".join(name_of(app) for app in sorted(session_apps))
        notes.append(
            f"transaction mode for everyone else; {names} use session features: connect them "
            "to the <db>_session entries below or directly to PostgreSQL"
        )
    else:
        notes.append(
            "transaction mode: no LISTEN, session advisory lock, PREPARE or session SET seen in "
            "the last statements (pg_stat_activity shows only the last one: check the code too)"
        )
    text = advice.pgbouncer_ini(
        pool_mode=pool_mode,
        default_pool_size=sizes.default_pool_size,
        reserve_pool_size=sizes.reserve_pool_size,
        max_client_conn=sizes.max_client_conn,
        max_db_connections=sizes.max_db_connections,
        databases=databases,
        port=context.snapshot.server.setting_int("port") or DEFAULT_PORT,
        session_pools={db: n + max(1, n // 5) for db, n in sorted(session_pools.items())},
        notes=notes,
    )
    return Fix(PGBOUNCER, text, title)
