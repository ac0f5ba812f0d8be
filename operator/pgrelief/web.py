"""``pgrelief web``: the troubleshooter as a local page to paste into.

The domain reference is a page you paste ``pg_stat_activity`` into; during an outage that is
also the easiest thing to hand a colleague. This serves one such page from the standard
library's HTTP server, on 127.0.0.1 only: the paste is diagnosed here, by the same code as
``pgrelief diagnose`` (``dumps.load_text`` then ``triage.diagnose_offline``), and the report
rendered here (``report_html``). Nothing is fetched from or sent to anywhere else, which the
Content-Security-Policy enforces in the browser too.

A paste is hostile input: it is size-limited like a dump file, every text in the page is
escaped, only the page's own nonce-carrying script runs, and requests naming another host
(a DNS-rebinding page trying to read the report) are refused.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import signal
import sys
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import parse_qs

from pgrelief.diagnose import DEFAULT_OPTIONS, DiagnoseOptions
from pgrelief.diagnosis import Diagnosis
from pgrelief.dumps import MAX_DUMP_BYTES, load_text
from pgrelief.errors import PgreliefError
from pgrelief.report_html import render_page
from pgrelief.triage import diagnose_offline

HOST = "127.0.0.1"
DEFAULT_PORT = 8432
PASTED = Path("pasted text")
# base64 and form encoding grow a dump; the form may carry the paste and a file.
_MAX_BODY = MAX_DUMP_BYTES * 4


def serve(port: int, options: DiagnoseOptions = DEFAULT_OPTIONS, out: IO[str] = sys.stdout) -> None:
    """Serve the page on 127.0.0.1:``port`` (0: any free port) until SIGINT or SIGTERM."""
    server = ThreadingHTTPServer((HOST, port), _handler(options))
    server.daemon_threads = True
    bound = server.server_address[1]
    print(
        f"pgrelief web: http://{HOST}:{bound}/ (this machine only; Ctrl-C stops it)",
        file=out,
        flush=True,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def diagnose_form(fields: dict[str, list[str]], options: DiagnoseOptions) -> tuple[Diagnosis, str]:
    """The diagnosis of a submitted form (a file, else the pasted text) and the text to show
    in the paste box again."""
    encoded = (fields.get("file_b64") or [""])[0]
    pasted = (fields.get("paste") or [""])[0]
    if encoded:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise PgreliefError("the dropped file did not arrive whole; drop it again") from None
        name = Path((fields.get("file_name") or [""])[0][:200] or "dropped file")
    else:
        data, name = pasted.encode("utf-8"), PASTED
    loaded = load_text(name, data)
    return diagnose_offline(loaded.found, options, loaded.notes), pasted


def _handler(options: DiagnoseOptions) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pgrelief"
        sys_version = ""

        def do_GET(self) -> None:
            if not self._local_host():
                return
            if self.path.split("?", 1)[0] != "/":
                self._send(
                    HTTPStatus.NOT_FOUND, lambda nonce: _page(None, "", "no such page", nonce)
                )
                return
            self._send(HTTPStatus.OK, lambda nonce: _page(None, "", None, nonce))

        def do_POST(self) -> None:
            if not self._local_host():
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > _MAX_BODY:
                limit = MAX_DUMP_BYTES // (1024 * 1024)
                self.close_connection = True
                self._send(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    lambda nonce: _page(
                        None, "", f"the paste is over {limit} MB; paste fewer columns", nonce
                    ),
                )
                return
            body = self.rfile.read(length).decode("utf-8", errors="replace")
            fields = parse_qs(body, keep_blank_values=True, max_num_fields=10)
            try:
                diagnosis, pasted = diagnose_form(fields, options)
            except PgreliefError as error:
                pasted = (fields.get("paste") or [""])[0]
                message = str(error)
                self._send(HTTPStatus.OK, lambda nonce: _page(None, pasted, message, nonce))
                return
            except Exception as error:  # the page, like the CLI, never shows a traceback
                message = f"internal error: {type(error).__name__}"
                self._send(
                    HTTPStatus.INTERNAL_SERVER_ERROR, lambda nonce: _page(None, "", message, nonce)
                )
                return
            self._send(HTTPStatus.OK, lambda nonce: _page(diagnosis, pasted, None, nonce))

        def _local_host(self) -> bool:
            """Only a page on this server may ask it: the Host must be the loopback one."""
            port = self.server.server_address[1]  # type: ignore[index]
            allowed = {f"{HOST}:{port}", f"localhost:{port}"}
            if self.headers.get("Host", "") in allowed:
                return True
            self._send(
                HTTPStatus.FORBIDDEN,
                lambda nonce: _page(None, "", "requests must name this machine", nonce),
            )
            return False

        def _send(self, status: HTTPStatus, render: Callable[[str], str]) -> None:
            nonce = secrets.token_urlsafe(16)
            body = render(nonce).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header(
                "Content-Security-Policy",
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "img-src 'none'; connect-src 'none'; form-action 'self'; base-uri 'none'; "
                "frame-ancestors 'none'",
            )
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # One line per request on stderr, never the paste.
            sys.stderr.write(f"pgrelief web: {self.command} {self.path[:80]!r}\n")

    return Handler


def _page(diagnosis: Diagnosis | None, pasted: str, error: str | None, nonce: str) -> str:
    return render_page(diagnosis, pasted=pasted, error=error, nonce=nonce)
