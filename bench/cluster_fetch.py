"""IMAP FETCH of flags and headers in one large folder in cluster mode: PostgreSQL statements and
rows per command, and wall time, as a client sees them (postier/server/imapfetch.py over
postier/store/cluster/mailboxes.py).

A throwaway PostgreSQL 15 (fsync off, pg_stat_statements loaded) and moto's S3 server (a process of
its own) hold one user's INBOX of N messages: 100 distinct ones appended through a ClusterStore in
this process, then N - 100 more rows made by one INSERT that refer to those bodies in turn (the
folder's UIDNEXT and HIGHESTMODSEQ set to match), so that a large folder costs seconds to make;
and a folder "Big" of 600 messages with header blocks of 30 KB (a FETCH batch holds about 70).
Two nodes (127.0.0.2 and .3) serve it (the made rows have MODSEQ 3 to 7: CHANGEDSINCE 6 answers for
a fifth of them). On node A one IMAP session selects INBOX and runs each
command --repeat times; for each, pg_stat_statements is reset before the last run and read after it
(statements of the benchmark's database, BEGIN/COMMIT/ROLLBACK counted apart), and the median
wall time of the runs is printed. Runs named "B: ..." follow a command of session B on node B
(not timed, not counted): a flag change, an APPEND (A's NOOP then takes in the new message) or an
EXPUNGE (A, not told of it, answers for the messages still there), which A's next FETCH must show.

    .venv/bin/python -m bench cluster-fetch [--messages 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import imaplib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.cluster_nodes import loopback_free  # noqa: E402
from bench.objectstore import MotoProcess  # noqa: E402
from tests.cluster.conftest import PG_BIN, PgServer  # noqa: E402
from tests.hardening.conftest import PASSWORD, add_cheap_user  # noqa: E402
from tests.harness import Instance  # noqa: E402

DOMAIN = "cluster.test"
USER = f"fetch@{DOMAIN}"
_TX = ("BEGIN", "COMMIT", "ROLLBACK")
BIG = 600  # messages of the folder "Big"


class _StatsPg(PgServer):
    """The test suite's throwaway PostgreSQL, with pg_stat_statements loaded."""

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 "
                "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w",
                  "start")


def _message(i: int, pad: int = 0) -> bytes:
    return (f"From: Sender {i} <sender{i}@example.net>\r\nTo: {USER}\r\nSubject: message {i}\r\n"
            + "".join(f"X-Pad-{k}: {'p' * 990}\r\n" for k in range(pad // 1000)) +
            f"Date: Mon, 1 Jan 2024 10:{i % 60:02d}:00 +0000\r\nMessage-ID: <fetch-{i}@example.net>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode() + b"text\r\n" * 50


def _populate(dsn: str, endpoint: str, n: int) -> None:
    from postier.message.types import User
    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.store import ClusterStore
    bodies = BodyStore(endpoint, "bench", "test", "test", timeout=10.0)
    bodies.ensure_bucket()
    store = ClusterStore(dsn, bodies, timeout=10.0)
    try:
        mb = store.acquire(User(USER, "fetch", DOMAIN, "maildir"))
        mb.ensure_defaults()
        mb.append_many("INBOX", [(_message(i), (), None) for i in range(min(n, 100))])
        mb.create("Big")  # header blocks of 30 KB: a FETCH batch (2 MiB) holds about 70
        for lo in range(0, BIG, 100):
            mb.append_many("Big", [(_message(i, pad=30_000), (), None) for i in range(lo, lo + 100)])
    finally:
        store.close()
    if n <= 100:
        return
    with psycopg.connect(dsn) as conn:
        fid = conn.execute("SELECT id FROM folders WHERE owner=%s AND name='INBOX'", (USER,)).fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO messages (folder, uid, body, size, flags, keywords, modseq, idate) "
                     "SELECT m.folder, g, m.body, m.size, (g %% 3 = 0)::int, '', 3 + g %% 5, m.idate "
                     "FROM generate_series(101, %s) g JOIN messages m ON m.folder = %s AND m.uid = 1 + (g - 1) %% 100",
                     (n, fid))
        conn.execute("UPDATE folders SET uidnext=%s, highestmodseq=10, recent_uid=%s WHERE id=%s", (n + 1, n + 1, fid))


def _stats(admin: psycopg.Connection[Any]) -> tuple[int, int, int, list[str]]:
    """(statements, their rows, BEGIN/COMMIT/ROLLBACK) since the reset, in the benchmark's database."""
    rows = admin.execute(
        "SELECT query, calls, rows FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "WHERE d.datname = current_database() AND query NOT LIKE '%%pg_stat_statements%%' ORDER BY calls DESC"
    ).fetchall()
    stmts = sum(int(c) for q, c, _r in rows if str(q).upper() not in _TX)
    nrows = sum(int(r) for q, _c, r in rows if str(q).upper() not in _TX)
    tx = sum(int(c) for q, c, _r in rows if str(q).upper() in _TX)
    return stmts, nrows, tx, [f"{c:>4} x {r:>6} rows {str(q)[:100]}" for q, c, r in rows if str(q).upper() not in _TX]


def _imap(inst: Instance) -> imaplib.IMAP4:
    c = imaplib.IMAP4(*inst.addr("imap"), timeout=60)
    c.starttls(inst.client_ssl_context())
    c.login(USER, PASSWORD)
    return c


def _measure(label: str, admin: psycopg.Connection[Any], run: Callable[[], object], repeat: int,
             verbose: bool, before: Callable[[], object] | None = None) -> None:
    """`run` timed `repeat` times, each after `before` (not timed, not counted)."""
    times = []
    for k in range(repeat):
        if before is not None:
            before()
        if k == repeat - 1:
            admin.execute("SELECT pg_stat_statements_reset()")
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    stmts, nrows, tx, lines = _stats(admin)
    print(f"{label:<48} {stmts:>3} statements, {nrows:>6} rows, {tx:>3} BEGIN/COMMIT; "
          f"median {statistics.median(times) * 1000:7.1f} ms", flush=True)
    if verbose:
        for line in lines:
            print("      " + line)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-fetch")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--verbose", action="store_true", help="print each statement of the measured run")
    args = ap.parse_args(argv)
    if not loopback_free(2, "the benchmark"):
        return 2
    pg, s3 = _StatsPg(), MotoProcess()
    tmp = Path(tempfile.mkdtemp(prefix="postier-fetch-bench-"))
    nodes: list[Instance] = []
    try:
        pg.start()
        dsn = pg.create_db()
        for i, addr in enumerate(("127.0.0.2", "127.0.0.3")):
            d = tmp / f"node{i}"
            d.mkdir()
            (d / "s3.secret").write_text("test\n")
            nodes.append(Instance(d, DOMAIN, address=addr, extra_config=(
                f'[cluster]\ndsn = "{dsn}"\ns3_endpoint = "{s3.endpoint}"\ns3_bucket = "bench"\n'
                f's3_access_key = "test"\ns3_secret_key_file = "s3.secret"\ntimeout = 10.0\n'
                "[auth]\nfailure_delay = 0.0\n")))
        add_cheap_user(nodes[0], USER)
        nodes[0].cli("cluster", "init")
        nodes[0].cli("cluster", "import-accounts")
        t = time.perf_counter()
        _populate(dsn, s3.endpoint, args.messages)
        print(f"INBOX of {args.messages} messages made in {time.perf_counter() - t:.1f} s; PostgreSQL 15 "
              "(fsync off), moto S3 in its own process; nodes A (127.0.0.2) and B (127.0.0.3)", flush=True)
        for inst in nodes:
            inst.start()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            a, b = _imap(nodes[0]), _imap(nodes[1])
            try:
                assert a.select("INBOX")[1] == [str(args.messages).encode()]
                b.select("INBOX")
                n = args.messages

                def fetch(*cmd: str) -> Callable[[], object]:
                    def run() -> object:
                        typ, data = a.fetch(*cmd)
                        assert typ == "OK", data
                        return data
                    return run

                flip = iter(range(10**6))

                def b_store() -> None:
                    typ, _d = b.store("1", "-FLAGS" if next(flip) % 2 else "+FLAGS", "(\\Flagged)")
                    assert typ == "OK"

                def b_append() -> None:
                    assert b.append("INBOX", None, None, _message(n))[0] == "OK"

                def b_expunge() -> None:
                    top = int(b.select("INBOX")[1][0] or 0)
                    assert b.store(str(top - 1), "+FLAGS", "(\\Deleted)")[0] == "OK"
                    assert b.expunge()[0] == "OK"

                def a_noop_fetch(*cmd: str) -> Callable[[], object]:
                    def run() -> object:
                        assert a.noop()[0] == "OK"
                        return fetch(*cmd)()
                    return run

                r = args.repeat
                print(f"{'':<48} (each: the last of {args.repeat} runs; node B's command before each run is "
                      "neither timed nor counted)")
                _measure("FETCH 1 (FLAGS)", admin, fetch("1", "(FLAGS)"), r, args.verbose)
                _measure(f"FETCH 1,{n} (FLAGS)", admin, fetch(f"1,{n}", "(FLAGS)"), r, args.verbose)
                _measure("FETCH 1:* (FLAGS)", admin, fetch("1:*", "(FLAGS)"), r, args.verbose)
                _measure("FETCH 1:* (FLAGS MODSEQ)", admin, fetch("1:*", "(FLAGS MODSEQ)"), r, args.verbose)
                _measure("FETCH 1:* (FLAGS) (CHANGEDSINCE high)", admin, fetch("1:*", "(FLAGS) (CHANGEDSINCE 1000000)"),
                         r, args.verbose)
                _measure("B: STORE; A: FETCH 1:* (FLAGS)", admin, fetch("1:*", "(FLAGS)"), r, args.verbose, b_store)
                _measure("B: APPEND; A: NOOP, FETCH 1:* (FLAGS)", admin, a_noop_fetch("1:*", "(FLAGS)"), r,
                         args.verbose, b_append)
                _measure("B: EXPUNGE; A: FETCH 1:* (FLAGS)", admin, fetch("1:*", "(FLAGS)"), r, args.verbose,
                         b_expunge)
                _measure("A: NOOP, FETCH 1:* (FLAGS)", admin, a_noop_fetch("1:*", "(FLAGS)"), r, args.verbose)
                _measure("FETCH 1:10 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])", admin,
                         fetch("1:10", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), r, args.verbose)
                _measure("FETCH 1:10 (ENVELOPE)", admin, fetch("1:10", "(ENVELOPE)"), r, args.verbose)
                _measure("FETCH 1:* (ENVELOPE) (CHANGEDSINCE high)", admin,
                         fetch("1:*", "(ENVELOPE) (CHANGEDSINCE 1000000)"), r, args.verbose)
                _measure("FETCH 1:* (ENVELOPE) (CHANGEDSINCE 6): a fifth", admin,
                         fetch("1:*", "(ENVELOPE) (CHANGEDSINCE 6)"), r, args.verbose)
                assert a.select("Big")[0] == "OK"
                _measure(f"Big: FETCH 1:* (BODY.PEEK[HEADER]), {BIG} x 30 KB", admin,
                         fetch("1:*", "(BODY.PEEK[HEADER])"), r, args.verbose)
            finally:
                for c in (a, b):
                    c.logout()
        return 0
    finally:
        for inst in nodes:
            inst.stop()
        s3.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
