"""The failed-login throttle across real cluster nodes (server/throttle.py `ClusterThrottle`,
store/cluster/throttle.py): failures from one IP spread over two nodes reach the refusal at
max_failures on both, a success on one node clears the other, two sessions failing at once on two
nodes are all counted, a flood of failed logins costs PostgreSQL a bounded number of statements
per node and second (pg_stat_statements), and with PostgreSQL stopped logins still answer (NO
[UNAVAILABLE]) promptly and the throttle is shared again once it is back.

Clients connect from chosen loopback addresses (127.0.x.y), so that each test's IPs are its own.
Where a test needs a node to have taken in what the table holds, it waits for that node to write
twice (`_caught_up`): each exchange reads the table and only then writes, so the second write
shows the first read was merged."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from tests.concurrency import together
from tests.harness import Instance, start_all  # noqa: E402

from .conftest import PG_BIN, PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, _can_bind, make_nodes  # noqa: E402

MAX_FAILURES = 6
AUTH = f"[auth]\nallow_plaintext = true\nfailure_delay = 0.0\nmax_failures = {MAX_FAILURES}\n"
DEADLINE = 30.0  # seconds a test waits for what one or two exchanges (1 s apart) bring


def _throttle_nodes(root: Path, dsn: str, s3: S3Server, auth: str = AUTH,
                    workers_a: int = 1) -> list[Instance]:
    if not _can_bind("127.0.2.200"):
        pytest.skip("no 127.0.0.0/8 source addresses")
    nodes = make_nodes(root, dsn, s3, cluster=auth)  # [auth] after [cluster]'s keys
    if workers_a != 1:
        text = nodes[0].config.read_text()
        nodes[0].config.write_text(text.replace(f"\nworkers = {nodes[0].workers}\n", f"\nworkers = {workers_a}\n"))
        nodes[0].workers = workers_a
    start_all(nodes, wait_role="imap")
    return nodes


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, pg: PgServer, s3: S3Server) -> Iterator[tuple[Instance, Instance, str]]:
    """Two nodes the module's tests share (each test's client addresses are its own)."""
    dsn = pg.create_db()
    a, b = _throttle_nodes(tmp_path_factory.mktemp("throttle"), dsn, s3)
    yield a, b, dsn
    a.stop()
    b.stop()


class Session:
    """An IMAP connection from `src` (plaintext LOGIN: `[auth] allow_plaintext` on loopback)."""

    def __init__(self, inst: Instance, src: str):
        self.sock = socket.create_connection(inst.addr("imap"), timeout=30, source_address=(src, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.n = 0

    def login(self, password: str) -> bytes:
        """The reply to one LOGIN of alice: the tagged line, or the BYE that ends the session."""
        self.n += 1
        tag = f"t{self.n}"
        self.sock.sendall(f'{tag} LOGIN {ALICE} "{password}"\r\n'.encode())
        while True:
            line = self.file.readline()
            if not line or line.startswith((tag.encode() + b" ", b"* BYE")):
                return line

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def refused(inst: Instance, src: str) -> bool:
    """Whether `inst` refuses `src` at the greeting (the check that counts nothing)."""
    s = Session(inst, src)
    try:
        assert s.greeting.startswith((b"* OK", b"* BYE")), s.greeting
        return s.greeting.startswith(b"* BYE") and b"failed logins" in s.greeting
    finally:
        s.close()


def fail(inst: Instance, src: str, times: int = 1) -> list[bytes]:
    """`times` wrong passwords from `src` on one connection (fewer when it is refused): the replies."""
    s = Session(inst, src)
    try:
        if s.greeting.startswith(b"* BYE"):
            return [s.greeting]
        replies = []
        for _ in range(times):
            r = s.login("wrong")
            replies.append(r)
            if not r.startswith(b"t") or b" NO [UNAVAILABLE]" in r:
                break
        return replies
    finally:
        s.close()


def _no(r: bytes) -> bool:
    return b" NO [AUTHENTICATIONFAILED]" in r


def _bye(r: bytes) -> bool:
    return r.startswith(b"* BYE") and b"failed logins" in r


def stamps(dsn: str, ip: str) -> dict[str, int]:
    """The table's stamps of `ip`, per node."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            rows = conn.execute("SELECT node, cardinality(stamps) FROM throttle_failures WHERE ip = %s",
                                (ip,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {node: n for node, n in rows}


def wait_for(what: str, check: Any, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        time.sleep(0.1)


def _caught_up(inst: Instance, dsn: str, probe: str) -> None:
    """`inst` (one worker) has merged everything the table held before this call: two of its
    exchanges have written a probe failure since (each reads before it writes)."""
    for _ in range(2):
        before = sum(stamps(dsn, probe).values())
        assert _no(fail(inst, probe)[0])
        wait_for(f"{probe}'s failure written", lambda b=before: sum(stamps(dsn, probe).values()) > b)


def test_failures_over_two_nodes_reach_the_refusal_on_both(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """Node A runs two workers (SharedThrottle under the cluster's), B one: 3 failures on each,
    fewer than either node refuses alone, and both refuse the IP at the next connection."""
    dsn = pg.create_db()
    a, b = _throttle_nodes(tmp_path, dsn, s3, workers_a=2)
    try:
        ip, other = "127.0.1.1", "127.0.1.2"
        replies = []
        for inst in (a, a, a, b, b, b):
            replies += fail(inst, ip)
        assert len(replies) == MAX_FAILURES and all(_no(r) or _bye(r) for r in replies), replies
        assert all(_no(r) for r in replies[:3]), replies  # A alone never refuses at 3
        wait_for("both nodes refuse the IP", lambda: refused(a, ip) and refused(b, ip))
        assert sum(stamps(dsn, ip).values()) == MAX_FAILURES and len(stamps(dsn, ip)) == 2
        assert not refused(a, other) and not refused(b, other)  # another IP is not slowed
        assert "counted on this node only" not in a.log.read_text() + b.log.read_text()
    finally:
        a.stop()
        b.stop()


def test_a_success_on_one_node_clears_the_other(two: tuple[Instance, Instance, str]) -> None:
    a, b, dsn = two
    ip = "127.0.1.3"
    assert all(_no(r) for r in fail(a, ip, 4))
    wait_for("A's 4 failures written", lambda: sum(stamps(dsn, ip).values()) == 4)
    _caught_up(b, dsn, "127.0.1.4")
    assert _no(fail(b, ip)[0])  # 5 in the cluster: one more anywhere is the refusal
    s = Session(b, ip)
    try:
        assert s.login(PASSWORD).startswith(b"t1 OK"), "alice logs in on B"
    finally:
        s.close()
    wait_for("the IP's rows blanked", lambda: stamps(dsn, ip) and not any(stamps(dsn, ip).values()))
    _caught_up(a, dsn, "127.0.1.5")
    replies = fail(a, ip, MAX_FAILURES)  # A's 4 are gone: five more are answered, the sixth refused
    assert [_no(r) for r in replies] == [True] * 5 + [False] and _bye(replies[-1]), replies


def test_two_sessions_failing_at_once_on_two_nodes(two: tuple[Instance, Instance, str]) -> None:
    a, b, dsn = two
    ip = "127.0.1.6"
    answered: dict[str, list[bytes]] = {}

    def session(inst: Instance, name: str) -> None:
        answered[name] = fail(inst, ip, 2 * MAX_FAILURES)

    together(lambda: session(a, "a"), lambda: session(b, "b"), timeout=60)
    failures = [r for rs in answered.values() for r in rs if r.startswith(b"t") or _bye(r) and r != rs[0]]
    every = [r for rs in answered.values() for r in rs]
    assert all(_no(r) or _bye(r) for r in every), answered
    # each node refuses at its own 6 at the latest; the cluster's count may stop them sooner
    assert MAX_FAILURES <= len(failures) <= 2 * MAX_FAILURES, answered
    wait_for("every failure in the table", lambda: sum(stamps(dsn, ip).values()) == len(failures))
    wait_for("both nodes refuse the IP", lambda: refused(a, ip) and refused(b, ip))


class StatsPg(PgServer):
    """A PostgreSQL that counts statements (pg_stat_statements)."""

    def start(self) -> None:
        if not (PG_BIN.parent.parent.parent.parent / "share/postgresql/15/extension/pg_stat_statements.control"
                ).exists():
            pytest.skip("pg_stat_statements is not installed")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 "
                "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w",
                  "start")


def _statement_counts(dsn: str) -> tuple[int, int]:
    """(calls of the throttle's statements, calls of every statement) since the last reset."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                            "WHERE d.datname = current_database()").fetchall()
    return sum(c for q, c in rows if "throttle_failures" in q), sum(c for _q, c in rows)


FLOOD_IPS = 20
#: failed logins in all (each costs an argon2 check, of the harness's cheapest parameters, and an
#: account read: about a second for 2000; the figures in docs/scaling.md are from this count)
FLOOD = int(os.environ.get("POSTIER_THROTTLE_FLOOD", "2000"))


def test_a_flood_of_failed_logins_costs_a_bounded_number_of_statements(tmp_path: Path, s3: S3Server) -> None:
    """FLOOD failed logins over two nodes from 20 IPs (no refusal: max_failures 100000), four
    sessions at once: the throttle's statements per node and second stay at 1/throttle_interval."""
    per_ip = FLOOD // FLOOD_IPS
    pg = StatsPg()
    try:
        pg.start()
        dsn = pg.create_db()
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # a long window: on a slow machine the flood's first failures must not age out before the end
        auth = "[auth]\nallow_plaintext = true\nfailure_delay = 0.0\nmax_failures = 100000\nfailure_window = 86400\n"
        a, b = _throttle_nodes(tmp_path, dsn, s3, auth=auth)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
            errors: list[str] = []

            def flood(inst: Instance, ips: list[str]) -> None:
                for ip in ips:
                    replies = fail(inst, ip, per_ip)
                    if len(replies) != per_ip or not all(_no(r) for r in replies):
                        errors.append(f"{ip}: {replies[-1]!r}")

            ips = [f"127.0.2.{i + 1}" for i in range(FLOOD_IPS)]
            jobs = [(a, ips[0:5]), (a, ips[5:10]), (b, ips[10:15]), (b, ips[15:20])]
            t0 = time.monotonic()
            together(*(partial(flood, *job) for job in jobs), timeout=max(240, FLOOD))
            elapsed = time.monotonic() - t0
            assert not errors, errors
            throttle_calls, all_calls = _statement_counts(dsn)
            per_node_second = throttle_calls / 2 / elapsed  # (two nodes)
            print(f"\nflood: {FLOOD_IPS * per_ip} failed logins over 2 nodes in {elapsed:.1f} s; "
                  f"throttle statements {throttle_calls} ({per_node_second:.2f} per node per second), "
                  f"all statements {all_calls}")
            # every failure reached the table (each node's row keeps the newest 64 of an IP)
            wait_for("the flood written", lambda: all(sum(stamps(dsn, ip).values()) == min(64, per_ip) for ip in ips))
            # one exchange a second per node (per worker), a sweep a minute, the table made at connection (3)
            processes = a.workers + b.workers
            assert throttle_calls <= processes * (elapsed / 1.0 + 1 + elapsed / 60 + 1 + 3), throttle_calls
        finally:
            a.stop()
            b.stop()
    finally:
        pg.remove()


def test_postgresql_stopped_logins_answer_and_the_throttle_recovers(tmp_path: Path, pg_own: PgServer,
                                                                     s3: S3Server) -> None:
    dsn = pg_own.create_db()
    a, b = _throttle_nodes(tmp_path, dsn, s3)
    try:
        assert _no(fail(a, "127.0.1.7")[0])
        wait_for("the table made and written", lambda: stamps(dsn, "127.0.1.7"))
        pg_own.stop()
        for inst in (a, b):
            t0 = time.monotonic()
            (r,) = fail(inst, "127.0.1.8")
            assert b" NO [UNAVAILABLE]" in r, r  # the accounts are in PostgreSQL: no answer but that
            assert time.monotonic() - t0 < 15, "a login waited for the throttle"  # cluster timeout 2 s
            assert not refused(inst, "127.0.1.8")  # UNAVAILABLE is not a failed login
        for inst in (a, b):
            wait_for("the warning", lambda i=inst: "counted on this node only" in i.log.read_text(), 60)
        pg_own.start()
        for inst in (a, b):
            wait_for("shared again", lambda i=inst: "shared with the other nodes again" in i.log.read_text(), 60)
            warned = inst.log.read_text().count("counted on this node only")
            assert 1 <= warned <= inst.workers, warned  # one warning per outage (and worker process)
        ip = "127.0.1.9"
        replies: list[bytes] = []
        end = time.monotonic() + 60
        for inst in (a, a, a, b, b, b):
            while True:  # the node's account connections come back with a back-off: UNAVAILABLE until then
                (r,) = fail(inst, ip)
                if b" NO [UNAVAILABLE]" not in r:
                    break
                assert time.monotonic() < end, r
                time.sleep(0.5)
            replies.append(r)
        assert all(_no(r) or _bye(r) for r in replies), replies
        wait_for("both nodes refuse the IP", lambda: refused(a, ip) and refused(b, ip))
    finally:
        a.stop()
        b.stop()
