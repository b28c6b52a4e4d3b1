"""The limits counted across real cluster nodes (server/limits.py over the throttle's exchange,
store/cluster/throttle.py): IMAP sessions of one user on two nodes reach `[imap]
max_connections_per_user` together and a closed one frees its place on the other node, a POP3 login
on node A makes node B answer LOGIN-DELAY (RFC 2449 §6.5), port 25's connection rate of one IP
spread over two nodes is refused at the limit on both, and two clients connecting at once on both
nodes are all counted.

Where a test needs a node to have taken in what the table holds, it waits for that node to write a
probe failure twice (tests/cluster/test_nodes_throttle.py `_caught_up`: each exchange reads before
it writes, and one statement carries the failures and these limits)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from tests.concurrency import together
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD  # noqa: E402
from .test_nodes_throttle import Session, _caught_up, _throttle_nodes, wait_for  # noqa: E402

PER_USER = 2
CONNS = 4
LIMITS = ("[auth]\nallow_plaintext = true\nfailure_delay = 0.0\nmax_failures = 6\n"
          f"[imap]\nmax_connections_per_user = {PER_USER}\n"
          "[pop3]\nlogin_delay = 600\n"
          f"[antispam]\nmax_connections_per_minute = {CONNS}\n")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, pg: PgServer, s3: S3Server) -> Iterator[tuple[Instance, Instance, str]]:
    """Two nodes the module's tests share (each test uses its own client addresses, and closes its
    sessions: the IMAP test's count of alice's sessions starts at none)."""
    dsn = pg.create_db()
    a, b = _throttle_nodes(tmp_path_factory.mktemp("limits"), dsn, s3, auth=LIMITS)
    yield a, b, dsn
    a.stop()
    b.stop()


def rows(dsn: str, kind: str, key: str) -> dict[str, list[int]]:
    """The table's counts of (kind, key), per node and process."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            found = conn.execute("SELECT node, proc, counts FROM cluster_limits WHERE kind = %s AND key = %s",
                                 (kind, key)).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {f"{node}#{proc}": list(counts) for node, proc, counts in found}


def login(inst: Instance, src: str) -> tuple[Session, bytes]:
    """An IMAP session of alice on `inst` from `src`, and the LOGIN's reply."""
    s = Session(inst, src)
    return s, s.login(PASSWORD)


def test_imap_sessions_of_one_user_over_two_nodes_reach_the_limit(two: tuple[Instance, Instance, str]) -> None:
    a, b, dsn = two
    on_a, r = login(a, "127.0.3.1")
    assert r.startswith(b"t1 OK"), r
    wait_for("A's session written", lambda: sum(c[0] for c in rows(dsn, "s", ALICE).values()) == 1)
    _caught_up(b, dsn, "127.0.3.2")
    on_b, r = login(b, "127.0.3.3")
    assert r.startswith(b"t1 OK"), r  # one on A, one here: the limit (2) is reached, not passed
    try:
        extra, r = login(b, "127.0.3.3")  # B alone holds one: only A's makes this the third
        extra.close()
        assert b" NO [LIMIT]" in r, r
        wait_for("B's session written", lambda: sum(c[0] for c in rows(dsn, "s", ALICE).values()) == 2)
        _caught_up(a, dsn, "127.0.3.4")
        extra, r = login(a, "127.0.3.1")
        extra.close()
        assert b" NO [LIMIT]" in r, r
        on_a.close()  # A's session ends: its place is free on B once A has written and B read it
        wait_for("A's count back to 0", lambda: sum(c[0] for c in rows(dsn, "s", ALICE).values()) == 1)
        _caught_up(b, dsn, "127.0.3.5")
        extra, r = login(b, "127.0.3.3")
        extra.close()
        assert r.startswith(b"t1 OK"), r
    finally:
        on_a.close()
        on_b.close()


def pop3_login(inst: Instance, src: str) -> bytes:
    """USER/PASS of alice on `inst`'s POP3 port, then QUIT: the reply to PASS."""
    with socket.create_connection(inst.addr("pop3"), timeout=30, source_address=(src, 0)) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\n".encode())
        assert f.readline().startswith(b"+OK")
        sock.sendall(f"PASS {PASSWORD}\r\n".encode())
        reply = f.readline()
        if reply.startswith(b"+OK"):
            sock.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"+OK")
        f.close()
        return reply


def test_pop3_login_delay_holds_across_nodes(two: tuple[Instance, Instance, str]) -> None:
    """RFC 2449 §6.5: alice logs in on A; B, where she never logged in, refuses her until the
    delay (600 s) has passed, once it has read A's login (one exchange)."""
    a, b, dsn = two
    s, r = login(a, "127.0.4.1")  # (IMAP's first login makes her folders: POP3 needs INBOX)
    s.close()
    assert r.startswith(b"t1 OK"), r
    assert pop3_login(a, "127.0.4.1").startswith(b"+OK"), "the first login"
    wait_for("A's login written", lambda: rows(dsn, "l", ALICE) != {})
    _caught_up(b, dsn, "127.0.4.2")
    r = pop3_login(b, "127.0.4.3")
    assert r.startswith(b"-ERR [LOGIN-DELAY]"), r
    assert pop3_login(a, "127.0.4.1").startswith(b"-ERR [LOGIN-DELAY]")  # A's own, as on one machine


def smtp_greeting(inst: Instance, src: str) -> bytes:
    with socket.create_connection(inst.addr("smtp"), timeout=30, source_address=(src, 0)) as sock:
        f = sock.makefile("rb")
        line = f.readline()
        f.close()
        return line


def test_port25_connection_rate_of_an_ip_over_two_nodes(two: tuple[Instance, Instance, str]) -> None:
    a, b, dsn = two
    ip = "127.0.5.1"
    for inst in (a, a, b, b):  # two each: neither node alone is at the limit (4)
        assert smtp_greeting(inst, ip).startswith(b"220 ")
    wait_for("the 4 connections written", lambda: sum(sum(c) for c in rows(dsn, "c", ip).values()) == CONNS)
    _caught_up(a, dsn, "127.0.5.2")
    _caught_up(b, dsn, "127.0.5.3")
    for inst in (a, b):
        r = smtp_greeting(inst, ip)
        assert r.startswith(b"421 "), r
    assert smtp_greeting(a, "127.0.5.4").startswith(b"220 ")  # another IP is not limited


def test_two_clients_connecting_at_once_on_two_nodes(two: tuple[Instance, Instance, str]) -> None:
    """Connections of one IP on both nodes at the same time: each node lets in at most the limit
    (what the other let in during the last interval is not known yet), every one let in reaches
    the table, and then both nodes refuse the IP."""
    a, b, dsn = two
    ip = "127.0.5.5"
    accepted = {"a": 0, "b": 0}

    def client(inst: Instance, name: str) -> None:
        for _ in range(CONNS + 2):
            if not smtp_greeting(inst, ip).startswith(b"220 "):
                return
            accepted[name] += 1

    together(lambda: client(a, "a"), lambda: client(b, "b"), timeout=60)
    total = accepted["a"] + accepted["b"]
    assert CONNS <= total <= 2 * CONNS and max(accepted.values()) <= CONNS, accepted
    wait_for("every connection in the table", lambda: sum(sum(c) for c in rows(dsn, "c", ip).values()) == total)
    _caught_up(a, dsn, "127.0.5.6")
    _caught_up(b, dsn, "127.0.5.7")
    assert smtp_greeting(a, ip).startswith(b"421 ") and smtp_greeting(b, ip).startswith(b"421 ")


def test_imap_sessions_with_two_workers_on_one_node(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """Node A runs two workers (each writes its own row; A's count is the table its workers share,
    server/shared.py), B one: one session on each node and A refuses a third login, whichever
    worker takes it (a login let in meanwhile is closed at once: it only delays the proof)."""
    dsn = pg.create_db()
    a, b = _throttle_nodes(tmp_path, dsn, s3, auth=LIMITS, workers_a=2)
    on_a = on_b = None
    try:
        on_a, r = login(a, "127.0.6.1")
        assert r.startswith(b"t1 OK"), r
        on_b, r = login(b, "127.0.6.2")
        assert r.startswith(b"t1 OK"), r

        def nodes_written() -> set[str]:  # the nodes whose rows hold one of alice's sessions
            return {k.rsplit("#", 1)[0] for k, c in rows(dsn, "s", ALICE).items() if c[0] > 0}
        wait_for("both nodes' sessions written", lambda: len(nodes_written()) == 2)

        def a_refuses() -> bool:
            s, r = login(a, "127.0.6.1")
            s.close()
            assert r.startswith(b"t1 OK") or b" NO [LIMIT]" in r, r
            return b" NO [LIMIT]" in r
        wait_for("A refuses a third session", a_refuses)
    finally:
        for s in (on_a, on_b):
            if s is not None:
                s.close()
        a.stop()
        b.stop()
