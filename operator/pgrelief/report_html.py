"""Renders a Diagnosis as one HTML page: the troubleshooter you paste into.

The page ``pgrelief web`` serves is the text report laid out for a browser, in the order a
tired on-call engineer needs it: the verdict, the notes that qualify it, the emergency SQL
with copy buttons, a chart of who holds the slots (by state, by application), then every
finding with its evidence and fixes. It is rendered here, on the server, as plain HTML with
an inline SVG chart: no build step, no script or style from anywhere else.

Everything shown comes from a paste, and a role or application name is whatever a client
chose to send: every text goes through ``html.escape``, and the page's Content-Security-Policy
(set by ``web``) runs only the one inline script carrying the page's nonce, so a name holding
``<script>`` is shown, never run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from pgrelief.diagnosis import (
    DURABLE_SQL,
    EMERGENCY_SQL,
    ORM,
    PGBOUNCER,
    Diagnosis,
    Finding,
    Fix,
    Severity,
)
from pgrelief.durations import human_age
from pgrelief.snapshot import ACTIVE, IDLE, IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED

_CODE_FIXES = frozenset({EMERGENCY_SQL, DURABLE_SQL, PGBOUNCER, ORM})
_STATE_COLOURS = (
    (ACTIVE, "#2e7d32"),
    (IDLE, "#607d8b"),
    (IDLE_IN_TRANSACTION, "#ef6c00"),
    (IDLE_IN_TRANSACTION_ABORTED, "#c62828"),
)
_OTHER_COLOUR = "#8e24aa"
_CHART_APPLICATIONS = 10
_LABEL_CHARS = 24
_PIDS_SHOWN = 20

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
textarea{width:100%;height:12em;font:13px monospace}
.drop{border:2px dashed #999;padding:.6em;margin:.4em 0}.drop.over{background:#eef}
.verdict{font-size:1.4em;font-weight:bold;padding:.4em .6em;border-radius:4px;color:#fff}
.healthy{background:#00838f}.warning{background:#f9a825;color:#222}.critical{background:#c62828}
.unknown{background:#6a1b9a}.info{background:#546e7a}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:.3em .6em;margin:.3em 0}
.error{background:#ffebee;border-left:4px solid #c62828;padding:.5em .8em}
pre{background:#f5f5f5;padding:.6em;overflow-x:auto;white-space:pre}
.fix{margin:.6em 0}.copy{float:right}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.15em .5em}
td.n{text-align:right}.finding{border-top:1px solid #ccc;padding-top:.4em}
.sev{font-size:.8em;padding:.1em .4em;border-radius:3px;color:#fff}
"""

_SCRIPT = """
document.querySelectorAll('button.copy').forEach(function (button) {
  button.addEventListener('click', function () {
    var text = document.getElementById(button.dataset.target).textContent;
    function done() { button.textContent = 'Copied'; }
    function select() {
      var range = document.createRange();
      range.selectNodeContents(document.getElementById(button.dataset.target));
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      if (document.execCommand('copy')) { done(); } else { button.textContent = 'Selected'; }
    }
    if (navigator.clipboard) { navigator.clipboard.writeText(text).then(done, select); }
    else { select(); }
  });
});
var drop = document.getElementById('drop');
var fileInput = document.getElementById('file');
function take(file) {
  var reader = new FileReader();
  reader.onload = function () {
    var bytes = new Uint8Array(reader.result), binary = '';
    for (var i = 0; i < bytes.length; i += 32768) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 32768));
    }
    document.getElementById('file_b64').value = btoa(binary);
    document.getElementById('file_name').value = file.name;
    drop.querySelector('span').textContent = file.name + ' (' + bytes.length + ' bytes)';
  };
  reader.readAsArrayBuffer(file);
}
fileInput.addEventListener('change', function () {
  if (fileInput.files[0]) take(fileInput.files[0]);
});
drop.addEventListener('dragover', function (e) { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', function () { drop.classList.remove('over'); });
drop.addEventListener('drop', function (e) {
  e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files[0]) take(e.dataTransfer.files[0]);
});
"""


def render_page(
    diagnosis: Diagnosis | None, *, pasted: str = "", error: str | None = None, nonce: str
) -> str:
    """The whole page: the paste form, then the report (or the one-line error)."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>pgrelief: what holds the connection slots</title>",
        f'<style nonce="{escape(nonce)}">{_STYLE}</style></head><body>',
    ]
    if error is not None:
        parts.append(f'<p class="error" id="error" role="alert">{escape(error)}</p>')
    if diagnosis is not None:
        parts.append(_report(diagnosis))
    parts.append(_form(pasted, collapsed=diagnosis is not None))
    parts.append(f'<script nonce="{escape(nonce)}">{_SCRIPT}</script></body></html>')
    return "\n".join(parts)


_FORM_HELP = (
    "<p>Paste <code>select now(), * from pg_stat_activity</code> (psql's aligned or "
    "<code>\\x</code> output, CSV or JSON), optionally followed by <code>show all</code>; or "
    "the output of the three triage queries. Nothing leaves this machine: the page is served "
    "by pgrelief on localhost.</p>"
)


def _form(pasted: str, *, collapsed: bool) -> str:
    rows = " rows='4'" if collapsed else ""
    return f"""<h1>pgrelief: paste what psql shows</h1>
<form method="post" action="/" id="paste-form">{_FORM_HELP}
<textarea name="paste" id="paste" spellcheck="false"{rows}>{escape(pasted)}</textarea>
<div class="drop" id="drop">or drop a dump file here, or choose one:
<input type="file" id="file"> <span></span></div>
<input type="hidden" name="file_b64" id="file_b64"><input type="hidden" name="file_name"
 id="file_name">
<p><button type="submit" id="diagnose">Diagnose</button></p>
</form>"""


def _report(diagnosis: Diagnosis) -> str:
    parts = [_verdict(diagnosis)]
    verdict = diagnosis.verdict
    if verdict is not None:
        # The verdict's one statement, as the text report leads with it; every finding's own
        # SQL stays with the finding below.
        if verdict.emergency is not None:
            parts.append('<section id="emergency"><h2>Run now (as a superuser)</h2>')
            parts.append(_code_fix(verdict.emergency, "emergency-1"))
            parts.append("</section>")
        if verdict.durable:
            parts.append('<section id="durable"><h2>So that it does not happen again</h2>')
            for number, fix in enumerate(verdict.durable, start=1):
                parts.append(_code_fix(fix, f"durable-{number}"))
            parts.append("</section>")
    else:  # a partial diagnosis (the triage queries): each finding's emergency SQL
        emergency = [
            (finding, fix)
            for finding in diagnosis.findings
            for fix in finding.fixes
            if fix.kind == EMERGENCY_SQL
        ]
        if emergency:
            parts.append('<section id="emergency"><h2>Emergency SQL (run now, as a superuser)</h2>')
            for number, (finding, fix) in enumerate(emergency, start=1):
                parts.append(_code_fix(fix, f"emergency-{number}", f"{finding.kind}: "))
            parts.append("</section>")
    if diagnosis.server is not None:
        parts.append(_chart(diagnosis))
        parts.append(_breakdowns(diagnosis))
    parts.append('<section id="findings"><h2>Findings</h2>')
    if not diagnosis.findings:
        parts.append("<p>No findings: connection usage looks healthy.</p>")
    for number, finding in enumerate(diagnosis.findings, start=1):
        parts.append(_finding(number, finding))
    parts.append("</section>")
    return "\n".join(parts)


def _verdict(diagnosis: Diagnosis) -> str:
    label = diagnosis.status.label
    parts = [
        '<section id="verdict">',
        f'<p><span class="verdict {label}" id="status">{escape(label.upper())}</span> '
        f"source: {escape(diagnosis.source)}"
        + (f", at {escape(diagnosis.taken_at)}" if diagnosis.taken_at else "")
        + "</p>",
    ]
    parts.extend(f'<p class="note">{escape(note)}</p>' for note in diagnosis.notes)
    server = diagnosis.server
    if server is None:
        parts.append("<p>The server refused our connection: no slot was free to look inside.</p>")
    else:
        totals = diagnosis.totals
        parts.append(
            f'<p id="slots">client backends <b>{totals.client_backends}</b> of '
            f"{server.usable_slots} usable slots = <b>{totals.utilization_percent:.1f}%</b> "
            f"(max_connections {server.max_connections}, superuser_reserved_connections "
            f"{server.superuser_reserved_connections}, reserved_connections "
            f"{server.reserved_connections}; plus {totals.other_backends} non-client backends)"
            "</p>"
        )
        if server.assumed:
            parts.append(
                '<p class="note">assumed PostgreSQL defaults for: '
                + escape(", ".join(server.assumed))
                + " (paste SHOW ALL after the activity to use the server's values)</p>"
            )
        states = ", ".join(f"{escape(s)}: {n}" for s, n in totals.by_state.items())
        parts.append(f"<p>by state: {states or 'no client sessions'}</p>")
    verdict = diagnosis.verdict
    if verdict is not None:
        first, *rest = verdict.summary
        parts.append(f'<p id="verdict-summary"><b>{escape(first)}</b></p>')
        if rest:
            parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in rest) + "</ul>")
        parts.extend(f'<p class="note">{escape(note)}</p>' for note in verdict.notes)
    top = next(iter(diagnosis.findings), None)
    if verdict is None and top is not None:
        parts.append(
            f"<p><b>{escape(top.severity.finding_label.upper())}</b> "
            f"{escape(top.kind)}: {escape(top.summary)}</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _code_fix(fix: Fix, anchor: str, prefix: str = "") -> str:
    return (
        f'<div class="fix"><button type="button" class="copy" data-target="{anchor}">Copy'
        f"</button><b>{escape(prefix + (fix.title or fix.kind))}</b>"
        f'<pre id="{anchor}">{escape(fix.text)}</pre></div>'
    )


def _chart(diagnosis: Diagnosis) -> str:
    """Stacked bars by state: all client backends, then the biggest applications."""
    rows: list[tuple[str, Mapping[str, int], int]] = [
        ("all client backends", diagnosis.totals.by_state, diagnosis.totals.client_backends)
    ]
    applications = diagnosis.breakdown.by_application
    rows.extend(
        (group.key or "(no application_name)", group.by_state, group.count)
        for group in applications[:_CHART_APPLICATIONS]
    )
    if len(applications) > _CHART_APPLICATIONS:
        rest = applications[_CHART_APPLICATIONS:]
        merged: dict[str, int] = {}
        for group in rest:
            for state, count in group.by_state.items():
                merged[state] = merged.get(state, 0) + count
        rows.append((f"{len(rest)} more applications", merged, sum(g.count for g in rest)))
    biggest = max((total for _, _, total in rows), default=0) or 1
    label_width, bar_width, row_height = 220, 480, 26
    height = row_height * len(rows) + 40
    width = label_width + bar_width + 60
    svg = [
        f'<svg id="connections-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="connections by state and by application">'
    ]
    for index, (label, states, total) in enumerate(rows):
        y = 10 + index * row_height
        shown = label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"
        svg.append(
            f'<text x="{label_width - 8}" y="{y + 16}" text-anchor="end" font-size="13">'
            f"<title>{escape(label)}</title>{escape(shown)}</text>"
        )
        x = float(label_width)
        for state, count in _by_colour(states):
            share = count * bar_width / biggest
            svg.append(
                f'<rect x="{x:.1f}" y="{y}" width="{share:.1f}" height="{row_height - 6}" '
                f'fill="{_colour(state)}" data-state="{escape(state)}"><title>'
                f"{escape(label)}: {escape(state)} {count}</title></rect>"
            )
            x += share
        svg.append(f'<text x="{x + 6:.1f}" y="{y + 16}" font-size="13">{total}</text>')
    legend_y = height - 12
    x = 10.0
    for state, colour in (*_STATE_COLOURS, ("other", _OTHER_COLOUR)):
        svg.append(f'<rect x="{x}" y="{legend_y - 10}" width="10" height="10" fill="{colour}"/>')
        svg.append(f'<text x="{x + 14}" y="{legend_y}" font-size="12">{escape(state)}</text>')
        x += 26 + 6.5 * len(state)
    svg.append("</svg>")
    return '<section id="chart"><h2>Who holds the slots</h2>' + "".join(svg) + "</section>"


def _by_colour(states: Mapping[str, int]) -> Iterable[tuple[str, int]]:
    known = {state for state, _ in _STATE_COLOURS}
    for state, _ in _STATE_COLOURS:
        if states.get(state):
            yield state, states[state]
    for state, count in states.items():
        if state not in known and count:
            yield state, count


def _colour(state: str) -> str:
    return dict(_STATE_COLOURS).get(state, _OTHER_COLOUR)


def _breakdowns(diagnosis: Diagnosis) -> str:
    parts = ['<section id="breakdowns"><h2>Where the slots went</h2>']
    breakdown = diagnosis.breakdown
    for title, groups in (
        ("By user", breakdown.by_user),
        ("By application", breakdown.by_application),
        ("By client address", breakdown.by_client_addr),
        ("By database", breakdown.by_database),
    ):
        if not groups:
            continue
        parts.append(f"<h3>{title}</h3><table><tr><th>key</th><th>total</th>")
        parts.extend(f"<th>{escape(state)}</th>" for state, _ in _STATE_COLOURS)
        parts.append("<th>oldest in state</th></tr>")
        for group in groups[:10]:
            cells = "".join(
                f'<td class="n">{group.by_state.get(state, 0)}</td>' for state, _ in _STATE_COLOURS
            )
            parts.append(
                f'<tr><td>{escape(group.key or "(none)")}</td><td class="n">{group.count}</td>'
                f'{cells}<td class="n">{escape(human_age(group.oldest_state_age_s))}</td></tr>'
            )
        if len(groups) > 10:
            parts.append(f"<tr><td>... {len(groups) - 10} more</td></tr>")
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)


def _finding(number: int, finding: Finding) -> str:
    label = finding.severity.finding_label
    colour = "info" if finding.severity is Severity.HEALTHY else label
    parts = [
        f'<div class="finding" id="finding-{number}"><p><span class="sev {colour}">'
        f"{escape(label.upper())}</span> <b>{escape(finding.kind)}</b>: "
        f"{escape(finding.summary)}</p>"
    ]
    if finding.evidence:
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in finding.evidence))
        parts.append("</ul>")
    if finding.pids:
        shown = ", ".join(str(pid) for pid in finding.pids[:_PIDS_SHOWN])
        more = len(finding.pids) - _PIDS_SHOWN
        parts.append(f"<p>pids: {shown}" + (f" (+{more} more)" if more > 0 else "") + "</p>")
    for index, fix in enumerate(finding.fixes, start=1):
        if fix.kind in _CODE_FIXES:
            parts.append(_code_fix(fix, f"fix-{number}-{index}"))
        else:
            parts.append(
                f'<div class="fix"><b>{escape(fix.title or fix.kind)}</b>'
                f"<p>{escape(fix.text).replace(chr(10), '<br>')}</p></div>"
            )
    parts.append("</div>")
    return "\n".join(parts)
