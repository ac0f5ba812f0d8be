"""What the report tells a tired on-call engineer (issue 10 items 10, 15-21), on hand-built
snapshots: the verdict (in the text report and the page), one sizing source, protected
sessions, lock holders, fresh spikes, assumed facts, timeouts, database limits, ORM advice for
every group, the server's port."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from html import escape

from pgrelief.diagnose import DiagnoseOptions, diagnose
from pgrelief.diagnosis import (
    DURABLE_SQL,
    EMERGENCY_SQL,
    IDLE_IN_TRANSACTION,
    LEAKED_IDLE,
    LOCK_BLOCKER,
    LONG_RUNNING,
    ORM,
    PGBOUNCER,
    ROLE_MONOPOLY,
    Diagnosis,
    Finding,
)
from pgrelief.report import render_text
from pgrelief.report_html import render_page
from pgrelief.snapshot import ServerFacts, given_max_connections
from tests.factories import (
    ACTIVE,
    IDLE,
    database,
    many,
    role,
    session,
    setting,
    settings,
    snapshot,
)
from tests.factories import IDLE_IN_TRANSACTION as IN_TX


def _texts(diagnosis: Diagnosis, kind: str | None = None) -> list[str]:
    """Every fix text of the diagnosis (of one fix kind), the verdict's included."""
    fixes = [fix for finding in diagnosis.findings for fix in finding.fixes]
    if diagnosis.verdict is not None:
        fixes += list(diagnosis.verdict.durable)
        if diagnosis.verdict.emergency is not None:
            fixes.append(diagnosis.verdict.emergency)
    return [fix.text for fix in fixes if kind is None or fix.kind == kind]


def _only(diagnosis: Diagnosis, kind: str) -> Finding:
    found = [f for f in diagnosis.findings if f.kind == kind]
    assert len(found) == 1, [f.kind for f in diagnosis.findings]
    return found[0]


def _report(diagnosis: Diagnosis, *, verbose: bool = False) -> str:
    out = io.StringIO()
    render_text(diagnosis, out, verbose=verbose)
    return out.getvalue()


# --- item 15: the verdict first ------------------------------------------------------------------


def _incident() -> list:  # type: ignore[type-arg]
    return [
        *many(11, 100, IDLE, application_name="checkout-api", state_age=4000),
        *many(3, 200, IN_TX, application_name="billing-worker", state_age=300),
        session(300, IDLE, usename="reporting", application_name="nightly", state_age=4000),
        session(301, ACTIVE, usename="postgres", application_name="psql", is_superuser=True),
    ]


def test_the_verdict_names_who_holds_the_slots_since_when_and_frees_them_in_one_statement() -> None:
    d = diagnose(snapshot(_incident(), max_connections=20))
    verdict = d.verdict
    assert verdict is not None
    assert verdict.summary[0].startswith("16 of 17 usable connection slots in use (94%)")
    assert verdict.summary[1] == (
        "11 idle from application 'checkout-api' on 10.0.0.1 (user 'app'), the oldest since "
        "10:53:20 UTC (1h6m ago)"
    )
    assert verdict.summary[2].startswith("3 idle in transaction from application 'billing-worker'")
    emergency = verdict.emergency
    assert emergency is not None and emergency.kind == EMERGENCY_SQL
    # One statement: the stuck transactions first (they hold locks), then the leaked idle.
    assert emergency.text.count("pg_terminate_backend") == 1
    rows = re.findall(r"\((\d+), '", emergency.text)
    assert rows[:3] == ["200", "201", "202"]
    assert set(rows) == {str(p) for p in (*range(100, 111), 200, 201, 202, 300)}
    assert "301" not in rows  # the superuser's session
    kinds = [fix.kind for fix in verdict.durable]
    assert kinds == sorted(kinds, key=[DURABLE_SQL, PGBOUNCER, ORM].index)
    assert len({fix.text for fix in verdict.durable}) == len(verdict.durable)


def test_the_brief_report_is_the_verdict_and_verbose_is_everything() -> None:
    d = diagnose(snapshot(_incident(), max_connections=20))
    brief, full = _report(d), _report(d, verbose=True)
    assert brief.count("pg_terminate_backend") == 1
    assert "By user" not in brief and "the three diagnostic queries" not in brief
    assert "By user" in full and "the three diagnostic queries" in full
    assert brief.index("pg_terminate_backend") < brief.index("Stop it happening again")
    for finding in d.findings:
        assert finding.kind in brief  # each finding in one line
    assert len(brief.splitlines()) * 2 < len(full.splitlines())


def test_without_pressure_the_statement_says_it_can_wait() -> None:
    d = diagnose(snapshot(many(3, 100, IDLE, state_age=4000)))
    assert d.verdict is not None
    assert d.verdict.summary[0].endswith(": no pressure")
    assert d.verdict.emergency is not None
    assert d.verdict.emergency.title == (
        "end 3 stale session(s) (no slot pressure: when convenient)"
    )
    healthy = diagnose(snapshot(many(3, 100, IDLE, state_age=5)))
    assert healthy.verdict is not None and healthy.verdict.emergency is None


def test_the_json_keeps_its_keys_and_adds_the_verdict() -> None:
    payload = diagnose(snapshot(_incident(), max_connections=20)).to_json()
    assert {"server", "totals", "breakdown", "findings", "verdict"} <= set(payload)
    assert set(payload["verdict"]) == {"summary", "emergency", "durable", "notes", "assumed"}


# --- item 16: one sizing source ------------------------------------------------------------------


def test_a_role_is_told_one_limit_and_each_application_one_pool_size() -> None:
    sessions = [
        *many(8, 100, IDLE, application_name="web", state_age=4000),
        *many(4, 200, IDLE, application_name="jobs", client_addr="10.0.0.2", state_age=4000),
        *many(2, 300, IN_TX, application_name="jobs", client_addr="10.0.0.3", state_age=600),
        *many(2, 400, IDLE, usename="etl", application_name="loader", state_age=10),
        *many(3, 500, IDLE, usename="postgres", application_name="psql", is_superuser=True),
    ]
    d = diagnose(
        snapshot(sessions, max_connections=25, roles=[role("postgres", is_superuser=True)])
    )
    assert {f.kind for f in d.findings} >= {LEAKED_IDLE, IDLE_IN_TRANSACTION, ROLE_MONOPOLY}
    texts = "\n".join(_texts(d))
    # usable 22 - 3 headroom = 19, split between the two roles that consume slots: 'app'
    # and 'etl' (the superuser is no consumer) -> 9
    assert set(re.findall(r"alter role app connection limit (\d+);", texts)) == {"9"}
    for application in ("web", "jobs"):
        sizes = set(
            re.findall(
                rf"pool per instance (\d+) [^\n]*?'{application}'|"
                rf"application '{application}'[^\n]*?pool per instance (\d+)",
                texts,
            )
        )
        assert len(sizes) == 1, (application, sizes)
    assert "/ 2 role(s)" in texts and "/ 3 role(s)" not in texts


# --- item 17: what run protects ------------------------------------------------------------------


def test_listeners_and_superusers_are_spared_and_listening_roles_get_no_idle_timeout() -> None:
    sessions = [
        *many(3, 100, IDLE, state_age=4000),
        session(200, IDLE, state_age=4000, query="LISTEN jobs"),
        session(201, IDLE, usename="postgres", state_age=4000, is_superuser=True),
        session(202, IDLE, usename="batch", state_age=4000),
    ]
    finding = _only(diagnose(snapshot(sessions)), LEAKED_IDLE)
    assert finding.pids == (100, 101, 102, 202)
    statement = next(f.text for f in finding.fixes if f.kind == EMERGENCY_SQL)
    assert "(200, " not in statement and "(201, " not in statement
    timeout = next(f.text for f in finding.fixes if "idle_session_timeout" in f.text)
    assert "alter role batch set idle_session_timeout" in timeout
    assert "alter role app set" not in timeout
    assert "not for 'app': its sessions LISTEN" in timeout


def test_unknown_superusers_are_rechecked_by_the_statement() -> None:
    # An offline dump cannot say who is a superuser: the statement asks the server.
    sessions = many(3, 100, IDLE, state_age=4000, is_superuser=None)
    finding = _only(diagnose(snapshot(sessions)), LEAKED_IDLE)
    statement = next(f.text for f in finding.fixes if f.kind == EMERGENCY_SQL)
    assert "usesysid not in (select oid from pg_roles where rolsuper)" in statement


# --- item 18: the lock holder, not its victims ---------------------------------------------------


def test_lock_waiters_lead_to_the_idle_transaction_holding_the_lock() -> None:
    holder = session(10, IN_TX, state_age=30, application_name="migrator")
    queued = session(11, ACTIVE, state_age=20, wait_event_type="Lock", wait_event="relation")
    queued.blocked_by = (10,)
    victims = []
    for pid in range(20, 25):
        victim = session(pid, ACTIVE, state_age=600, wait_event_type="Lock", wait_event="relation")
        victim.blocked_by = (11, 10)  # behind the queued ALTER and the holder
        victims.append(victim)
    d = diagnose(snapshot([holder, queued, *victims]), DiagnoseOptions(long_running_after_s=60))
    lock = _only(d, LOCK_BLOCKER)
    assert lock.pids == (10,)
    assert lock.summary.startswith(
        "pid 10 (user 'app', application 'migrator'), idle in transaction"
    )
    statement = next(f.text for f in lock.fixes if f.kind == EMERGENCY_SQL)
    assert "(10, " in statement
    assert all(f"({v.pid}, " not in statement for v in (queued, *victims))
    assert d.finding(LONG_RUNNING) is None  # its victims are not to be cancelled


def test_lock_waits_without_known_blockers_keep_the_blocker_query() -> None:
    waiters = many(8, 100, ACTIVE, state_age=5, wait_event_type="Lock", wait_event="tuple")
    d = diagnose(snapshot(waiters, max_connections=20))
    assert d.finding(LOCK_BLOCKER) is None
    assert any("pg_blocking_pids(pid)" in text for text in _texts(d, EMERGENCY_SQL))


# --- item 19: a fresh spike ----------------------------------------------------------------------


def test_a_fresh_spike_says_what_would_free_slots_and_which_flag_lists_them() -> None:
    young = [session(100 + i, IDLE, state_age=5 + i) for i in range(18)]
    d = diagnose(snapshot(young, max_connections=23))  # 18 of 20 usable: critical
    assert d.verdict is not None and d.verdict.emergency is None
    notes = "\n".join(d.verdict.notes)
    # 70% of 20 is 14 sessions: 5 must go; the 5th oldest has been idle 18s
    assert "5 session(s) must go to get below 70%" in notes
    assert (
        "run again with --idle-after 18s to get the statement that terminates the 5 idle" in notes
    )
    again = diagnose(snapshot(young, max_connections=23), DiagnoseOptions(idle_after_s=18))
    assert again.verdict is not None and again.verdict.emergency is not None
    assert len(re.findall(r"\(\d+, '", again.verdict.emergency.text)) == 5


# --- item 20: assumed facts ----------------------------------------------------------------------


def _dump_without_settings(count: int) -> object:
    snap = snapshot(many(count, 100, IDLE, is_superuser=None))
    server = ServerFacts(
        version_num=None,
        max_connections=100,
        superuser_reserved_connections=3,
        reserved_connections=0,
        assumed=("max_connections", "superuser_reserved_connections", "reserved_connections"),
    )
    return type(snap)(taken_at=snap.taken_at, server=server, sessions=snap.sessions)


def test_assumed_slot_settings_come_first_and_a_given_max_connections_replaces_them() -> None:
    snap = _dump_without_settings(27)
    d = diagnose(snap)  # type: ignore[arg-type]
    assert d.verdict is not None
    assert d.verdict.assumed == (
        "max_connections",
        "superuser_reserved_connections",
        "reserved_connections",
    )
    assert d.verdict.notes[0].startswith("ASSUMED, not observed: max_connections=100")
    lines = _report(d).splitlines()
    assert lines[0].startswith("pgrelief diagnosis: HEALTHY (on assumed settings)")
    assert lines[1].startswith("ASSUMED, not observed")
    given = diagnose(replace(snap, server=given_max_connections(snap.server, 30)))  # type: ignore[attr-defined]
    assert given.server is not None and given.server.usable_slots == 27
    assert given.status.label == "critical"
    assert given.verdict is not None and "max_connections" not in given.verdict.assumed


# --- item 21 -------------------------------------------------------------------------------


def test_timeouts_are_never_the_short_thresholds_used_to_look() -> None:
    sessions = [
        *many(2, 100, IDLE, state_age=10),
        *many(2, 200, IN_TX, state_age=10),
        *many(2, 300, ACTIVE, state_age=10),
    ]
    options = DiagnoseOptions(idle_after_s=5, idle_in_transaction_after_s=5, long_running_after_s=5)
    texts = "\n".join(_texts(diagnose(snapshot(sessions), options), DURABLE_SQL))
    assert "alter role app set idle_in_transaction_session_timeout = '1min';" in texts
    assert "alter role app set idle_session_timeout = '30min';" in texts
    assert "alter role app set statement_timeout = '5min';" in texts
    assert "= '5s'" not in texts
    # A longer threshold than the default is kept: the user says sessions may take that long.
    long = DiagnoseOptions(idle_in_transaction_after_s=600)
    stuck = diagnose(snapshot(many(2, 200, IN_TX, state_age=700)), long)
    assert any("idle_in_transaction_session_timeout = '10min'" in t for t in _texts(stuck))


def test_one_database_holding_most_slots_gets_a_database_limit() -> None:
    sessions = [
        *many(14, 100, IDLE, datname="shop", state_age=5),
        *many(2, 200, IDLE, usename="bi", datname="analytics", state_age=5),
    ]
    d = diagnose(snapshot(sessions, max_connections=23, databases=[database("shop")]))
    texts = "\n".join(_texts(d, DURABLE_SQL))
    # 17 of 20 usable - 3 headroom, between 2 databases -> 8
    assert "alter database shop connection limit 8;" in texts


def test_every_application_group_gets_its_pool_advice() -> None:
    applications = ["svc-a", "svc-b", "svc-c", "svc-d", "sidekiq"]
    sessions = [
        s
        for index, name in enumerate(applications)
        for s in many(2, 100 + 10 * index, IDLE, application_name=name, state_age=4000)
    ]
    finding = _only(diagnose(snapshot(sessions)), LEAKED_IDLE)
    orm = "\n".join(fix.text for fix in finding.fixes if fix.kind == ORM)
    for name in applications:
        assert f"'{name}'" in orm, name


def test_the_pgbouncer_ini_uses_the_port_the_server_reported() -> None:
    sessions = many(40, 100, IDLE, state_age=5)
    d = diagnose(snapshot(sessions, server_settings=settings(setting("port", "6543"))))
    ini = next(t for t in _texts(d, PGBOUNCER))
    assert "appdb = host=127.0.0.1 port=6543 dbname=appdb" in ini


# --- item 10: nothing raw on the terminal --------------------------------------------------------


def test_the_report_shows_no_control_character_raw() -> None:
    hostile = "x\x1b[2J\x1b]0;t\x07\u2028\x85\u202ey"
    sessions = [
        *many(
            15,
            100,
            IDLE,
            usename=hostile,
            application_name=hostile,
            datname=hostile,
            state_age=4000,
        ),
        *many(3, 200, IN_TX, usename=hostile, state_age=600),
    ]
    d = diagnose(snapshot(sessions, max_connections=20))
    for verbose in (False, True):
        text = _report(d, verbose=verbose)
        assert re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u202e]", text) is None
        assert "x\\x1b[2J" in text


def test_the_page_leads_with_the_same_verdict_and_one_statement() -> None:
    d = diagnose(snapshot(_incident(), max_connections=20))
    assert d.verdict is not None and d.verdict.emergency is not None
    page = render_page(d, nonce="n")
    sections = re.findall(r'<section id="([a-z-]+)"', page)
    assert sections[:4] == ["verdict", "emergency", "durable", "chart"], sections
    verdict_html = page[
        page.index('<section id="verdict">') : page.index('<section id="emergency"')
    ]
    for line in d.verdict.summary:
        assert escape(line) in verdict_html
    emergency_html = page[
        page.index('<section id="emergency">') : page.index('<section id="durable"')
    ]
    assert emergency_html.count("<pre") == 1
    assert escape(d.verdict.emergency.text) in emergency_html
    for fix in d.verdict.durable:
        assert escape(fix.text) in page
