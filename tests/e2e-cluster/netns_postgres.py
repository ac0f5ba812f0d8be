"""PostgreSQL for the e2e cluster, outside it: a server process in the node's network namespace.

Like a managed database next to a cluster, it is not a pod: pods reach it on the node address
(and PostgreSQL sees each pod's own address as client_addr, which pgrelief's diagnosis keys
on), while the tests on the host reach it through its Unix socket, a file. It is the project's
embedded server (``pgrelief._dev.embedded``: PostgreSQL 18, or ``$PGRELIEF_PG_BINDIR``),
listening on 127.0.0.1 and the node address of the namespace, trusting the pod network.

    nsenter --net=/proc/<init pid>/ns/net python3 netns_postgres.py NODE_IP POD_SUBNET
prints one JSON line (port, socket directory, ...) and runs until its stdin closes.
"""

from __future__ import annotations

import json
import sys

from pgrelief._dev.embedded import EmbeddedPostgres

MAX_CONNECTIONS = 50


def main(argv: list[str]) -> int:
    node_ip, pod_subnet = argv
    server = EmbeddedPostgres(
        max_connections=MAX_CONNECTIONS,
        settings={"listen_addresses": f"127.0.0.1,{node_ip}"},
    )
    with server:
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text(hba.read_text() + f"host all all {pod_subnet} trust\n")
        with server.connect() as conn:
            conn.execute("select pg_reload_conf()")
        print(
            json.dumps(
                {
                    "host": node_ip,
                    "port": server.port,
                    "socket_dir": str(server.socket_dir),
                    "version": server.version,
                    "max_connections": MAX_CONNECTIONS,
                }
            ),
            flush=True,
        )
        sys.stdin.read()  # until the test session closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
