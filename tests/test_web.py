"""``pgrelief web`` in a real headless Chromium: paste a real dump, get the CLI's report.

The dumps are written by real psql from the live test server; the page's verdict and
emergency SQL are compared with ``pgrelief diagnose`` on the same paste. A paste whose
application_name holds ``<script>`` is shown as text and does not run. A screenshot of each
report is kept under pytest's tmp dir (its path is printed).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgrelief._dev.embedded import EmbeddedPostgres
from pgrelief.diagnosis import EMERGENCY_SQL
from tests.fixtures.browser import Browser
from tests.fixtures.postgres import SessionFactory
from tests.test_paste_input import ACTIVITY, SEED_QUERIES, pgrelief, run_psql

SCRIPT_NAME = "<script>window.__pwned=1</script>"
IMG_NAME = "<img src=x onerror=window.__pwned=2>"


@pytest.fixture
def web() -> Iterator[str]:
    """``pgrelief web --port 0`` as a user starts it; stopped with SIGTERM, which must exit 0."""
    server = subprocess.Popen(
        [sys.executable, "-m", "pgrelief", "web", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("pgrelief web: http://127.0.0.1:"), line
    try:
        yield line.split()[2]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0


def cli_report(paste: bytes) -> dict[str, Any]:
    done = pgrelief("diagnose", "--activity-file", "-", "--format", "json", stdin=paste)
    assert done.returncode in (0, 1, 2), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def submit(browser: Browser, url: str, paste: str) -> None:
    browser.get(url)
    box = browser.find("#paste")
    # What a paste does: the text lands in the box at once (typing it key by key is slow).
    browser.execute("arguments[0].value = arguments[1];", browser.element_arg(box), paste)
    browser.click(browser.find("#diagnose"))
    browser.wait_for("#verdict")


def keep_screenshot(browser: Browser, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    browser.screenshot(path)
    assert path.read_bytes().startswith(b"\x89PNG")
    with capsys.disabled():
        print(f"\nscreenshot of the report: {path}")


def assert_nothing_ran_or_loaded(browser: Browser) -> None:
    assert browser.execute("return window.__pwned === undefined;") is True
    assert browser.alert_text() is None
    assert browser.execute("return document.querySelectorAll('script').length;") == 1
    assert browser.execute("return document.querySelectorAll('img').length;") == 0
    # Nothing fetched but the page itself: no script, style, font or image from anywhere.
    assert browser.execute("return performance.getEntriesByType('resource').length;") == 0


@pytest.mark.browser
def test_a_pasted_dump_shows_the_verdict_the_sql_and_the_chart(
    browser: Browser,
    web: str,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.incident()
    sessions.idle(app=SCRIPT_NAME)
    sessions.idle(app=IMG_NAME)
    paste = run_psql(pg_server, pg_server.tool("psql"), ACTIVITY, "show all")
    expected = cli_report(paste)
    assert expected["status"] in ("warning", "critical")  # the saturation finding's SQL

    submit(browser, web, paste.decode())
    status = browser.text(browser.find("#status"))
    assert status == expected["status"].upper()
    # As the text report: the verdict (who holds the slots), its one statement to run now,
    # the durable fixes, then the chart.
    order = browser.execute(
        "var ids = Array.from(document.querySelectorAll('section')).map(s => s.id);return ids;"
    )
    # Sessions seconds old are nobody's to terminate yet: no statement to run now, and the
    # verdict says which threshold would free them (tests/test_diagnose_oncall.py has the page
    # with a statement).
    verdict = expected["verdict"]
    assert verdict["emergency"] is None
    assert order[:3] == ["verdict", "durable", "chart"], order
    shown_verdict = browser.text(browser.find("#verdict"))
    for line in [*verdict["summary"], *verdict["notes"]]:
        assert " ".join(line.split()) in " ".join(shown_verdict.split()), line
    durable = browser.execute(
        "return Array.from(document.querySelectorAll('#durable pre')).map(p => p.textContent);"
    )
    assert durable == [fix["text"] for fix in verdict["durable"]]
    findings_sql = browser.execute(
        "return Array.from(document.querySelectorAll('#findings pre')).map(p => p.textContent);"
    )
    for finding in expected["findings"]:  # every finding keeps its own SQL below
        for fix in finding["fixes"]:
            if fix["kind"] == EMERGENCY_SQL:
                assert fix["text"] in findings_sql
    copy = browser.find("#durable button.copy")
    browser.click(copy)
    deadline = time.monotonic() + 10  # the clipboard answers asynchronously
    while browser.text(copy) == "Copy" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.text(copy) in ("Copied", "Selected")

    bars = browser.find_all("#connections-chart rect[data-state]")
    assert len(bars) >= len(expected["totals"]["by_state"])
    chart = browser.execute("return document.getElementById('chart').textContent;")
    for application in ("web", "metabase", "etl-lock", SCRIPT_NAME, IMG_NAME):
        assert application in chart, application  # each label's full text is its title
    assert str(expected["totals"]["client_backends"]) in chart

    body = browser.text(browser.find("body"))
    assert SCRIPT_NAME in body and IMG_NAME in body  # shown as text
    assert_nothing_ran_or_loaded(browser)
    keep_screenshot(browser, tmp_path / "report.png", capsys)


@pytest.mark.browser
def test_the_triage_queries_give_the_partial_report(
    browser: Browser,
    web: str,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.incident()
    paste = run_psql(pg_server, pg_server.tool("psql"), "\\x on", *SEED_QUERIES)
    expected = cli_report(paste)
    submit(browser, web, paste.decode())
    assert browser.text(browser.find("#status")) == expected["status"].upper()
    notes = browser.execute(
        "return Array.from(document.querySelectorAll('#verdict .note')).map(n => n.textContent);"
    )
    assert notes[0].startswith("partial diagnosis from the seed's triage queries only")
    sql = browser.execute(
        "return Array.from(document.querySelectorAll('#emergency pre')).map(p => p.textContent);"
    )
    assert any("\\copy (select now(), * from pg_stat_activity)" in text for text in sql)
    assert_nothing_ran_or_loaded(browser)
    keep_screenshot(browser, tmp_path / "partial-report.png", capsys)


@pytest.mark.browser
def test_a_chosen_latin1_file_is_read_with_its_note(
    browser: Browser,
    web: str,
    pg_server: EmbeddedPostgres,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    holder = sessions.idle(app="dessert")
    holder.conn.execute("select 'crème brûlée'")
    sessions.wait_for(holder.pid, state="idle")
    dump = tmp_path / "latin1.txt"
    dump.write_bytes(
        run_psql(pg_server, pg_server.tool("psql"), "set client_encoding = 'LATIN1'", ACTIVITY)
    )
    browser.get(web)
    chooser = browser.find("#file")
    browser.call("POST", f"/element/{chooser}/value", {"text": str(dump)})
    deadline = time.monotonic() + 30
    while not browser.execute("return document.getElementById('file_b64').value.length;"):
        assert time.monotonic() < deadline, "the chosen file was never read"
        time.sleep(0.05)
    browser.click(browser.find("#diagnose"))
    browser.wait_for("#verdict")
    notes = browser.execute(
        "return Array.from(document.querySelectorAll('#verdict .note')).map(n => n.textContent);"
    )
    assert notes[0].startswith(f"{dump.name} is not UTF-8: it was read as LATIN1 (ISO 8859-1)")
    assert browser.text(browser.find("#status")) == "HEALTHY"
    assert browser.execute("return document.getElementById('paste').value;") == ""


def http(url: str, *, host: str | None = None, data: bytes | None = None, **headers: str) -> int:
    request = urllib.request.Request(url, data=data, headers=headers)
    if host is not None:
        request.add_unredirected_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)


def test_the_page_answers_only_this_machine(web: str) -> None:
    assert http(web) == 200
    port = int(web.rstrip("/").rsplit(":", 1)[1])
    assert http(web, host=f"localhost:{port}") == 200
    assert http(web, host="evil.example") == 403  # a DNS-rebinding page cannot read it
    assert http(web + "other") == 404
    too_big = http(web, data=b"paste=x", **{"Content-Length": str(10**10)})
    assert too_big == 413
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=5):
        pass  # bound to 127.0.0.1 only
