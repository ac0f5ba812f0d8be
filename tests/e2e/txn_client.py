"""A continuous database client for the e2e tests, run *inside* an application pod.

It stands for an application whose connection pool keeps connections open and reconnects when
one is closed: each of ``--clients`` threads holds one connection and runs transactions
(``BEGIN``; an UPDATE of its own counter row; a short ``pg_sleep``; ``COMMIT``) until the file
``--stop-file`` appears. What happens to each transaction is counted:

- ``committed``: COMMIT returned;
- ``failed``: the transaction had begun and was cut (an error after BEGIN, before COMMIT
  returned), or COMMIT itself failed: the application would see an error mid-transaction;
- ``retried``: the connection was gone before the transaction began (BEGIN failed): nothing
  ran, the client reconnects and tries again, as a pool's pre-ping does.

It prints one JSON object with those counts and the committed count per client, which the
test compares with the counter rows in the database (``roll_counter``): a transaction
reported committed that the database does not have, or the reverse, is a lost write.
Only psycopg (the client image's python3-psycopg) and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

import psycopg


def _connect(args: argparse.Namespace) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=args.host,
        port=args.port,
        dbname=args.dbname,
        user=args.user,
        password=os.environ.get("PGPASSWORD"),
        application_name="txn-client",
        autocommit=True,  # BEGIN and COMMIT are sent explicitly, so each step is seen
        connect_timeout=5,
        prepare_threshold=None,  # server-side prepared statements break transaction pooling
    )


def _client(args: argparse.Namespace, number: int, counts: dict[str, Any]) -> None:
    """One pooled connection's life; ``counts`` is this thread's own."""
    conn: psycopg.Connection[Any] | None = None
    while not os.path.exists(args.stop_file):
        if conn is None or conn.closed:
            try:
                conn = _connect(args)
            except psycopg.OperationalError:
                counts["connect_errors"] += 1
                time.sleep(0.05)
                continue
        try:
            conn.execute("BEGIN")
        except psycopg.OperationalError:
            counts["retried"] += 1
            conn.close()
            continue
        except psycopg.Error as error:
            counts["failed"] += 1
            counts["errors"].append(f"client {number} at BEGIN: {error}"[:300])
            conn.close()
            continue
        try:
            conn.execute("UPDATE roll_counter SET n = n + 1 WHERE client = %s", (number,))
            conn.execute("SELECT pg_sleep(%s)", (args.sleep_ms / 1000,))
            conn.execute("COMMIT")
        except psycopg.Error as error:
            counts["failed"] += 1
            counts["errors"].append(f"client {number}: {type(error).__name__}: {error}"[:300])
            conn.close()
            continue
        counts["committed"] += 1
    if conn is not None:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sleep-ms", type=float, default=20.0)
    parser.add_argument("--stop-file", default="/tmp/stop")
    args = parser.parse_args()
    keys = ("committed", "failed", "retried", "connect_errors")
    per_thread: list[dict[str, Any]] = [
        {**dict.fromkeys(keys, 0), "errors": []} for _ in range(args.clients)
    ]
    started = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(args, n, per_thread[n]), daemon=True)
        for n in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals: dict[str, Any] = {key: sum(c[key] for c in per_thread) for key in keys}
    totals["errors"] = [e for c in per_thread for e in c["errors"]]
    totals["per_client"] = [c["committed"] for c in per_thread]
    totals["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
