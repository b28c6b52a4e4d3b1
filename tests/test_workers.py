"""`[server] workers = 2` against real clients: a supervisor and two worker processes sharing every
listener (server/supervisor.py, server/shared.py). Each cross-session behaviour is proven with two
clients that are known to be served by different workers (the harness finds the worker holding a
connection through /proc): IDLE wakes and concurrent-session updates, the connection limits, the
login throttle, the daily sending limit and POP3's maildrop lock are shared; reload and stop reach
every worker; a worker killed with SIGKILL is restarted and loses nothing it acknowledged."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postier.server import stats
from tests.concurrency import together
from tests.dnsserver import DNSServer
from tests.harness import Instance, free_port
from tests.hardening.conftest import PASSWORD, Line, add_cheap_user, wait_for

CONFIG = """
[limits]
max_connections = 200
max_connections_per_ip = 4
[auth]
failure_delay = 0.05
max_failures = 3
allow_plaintext = true
[imap]
max_connections_per_user = 100
[submission]
max_messages_per_day = 2
"""


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    with DNSServer() as dns:
        dns.servfail("defer.test")
        root: Path = tmp_path_factory.mktemp("workers")
        i = Instance(root, "w.test", extra_config=CONFIG + f'[dns]\nnameservers = ["{dns.nameserver}"]\n',
                     workers=2)
        i.start()
        wait_for(lambda: len(i.worker_pids()) == 2, 20, "two workers")
        try:
            yield i
        finally:
            i.stop()


def spread[C](inst: Instance, connect: Callable[[], C], sock: Callable[[C], socket.socket],
              close: Callable[[C], object], tries: int = 60) -> tuple[C, C]:
    """Two connections served by different workers: connect until both workers hold one (bounded),
    closing the rest."""
    held: dict[int, C] = {}
    try:
        for _ in range(tries):
            c = connect()
            pid = inst.worker_of(sock(c))
            if pid is not None and pid not in held:
                held[pid] = c
                if len(held) == 2:
                    a, b = held.values()
                    return a, b
            else:
                close(c)
                time.sleep(0.1)  # the server sees the close (per-IP limit) before the next connect
        raise AssertionError(f"no two workers in {tries} connections: {inst.worker_pids()}")
    except BaseException:
        for c in held.values():
            close(c)
        raise


def imap_pair(inst: Instance, user: str, source: str) -> tuple[Line, Line]:
    def connect() -> Line:
        c = Line(inst.addr("imap"), source)
        assert c.line().startswith(b"* OK")
        assert c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1].startswith(b"l OK")
        return c
    return spread(inst, connect, lambda c: c.sock, Line.close)


def next_matching(c: Line, pred: Callable[[bytes], bool], most: int = 10) -> bytes:
    """The next line the server sends that satisfies `pred` (other untagged lines skipped)."""
    seen = []
    for _ in range(most):
        ln = c.line()
        if pred(ln):
            return ln
        seen.append(ln)
    raise AssertionError(f"not among {seen}")


def test_supervisor_runs_two_workers_and_reload_reaches_both(inst: Instance) -> None:
    pids = inst.worker_pids()
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    sup = int((inst.root / "run" / "postier.pid").read_text())
    assert sup == inst.proc.pid if inst.proc else False  # `postier reload` signals the supervisor
    before = inst.log.read_text().count("reloaded ")
    assert inst.cli("reload").returncode == 0
    wait_for(lambda: inst.log.read_text().count("reloaded ") >= before + 2, 20, "both workers reloaded")


def test_idle_wakes_across_workers(inst: Instance) -> None:
    user = add_cheap_user(inst, "idle@w.test")
    a, b = imap_pair(inst, user, "127.0.0.31")
    with a, b:
        assert b.imap(b"s", b"SELECT INBOX")[1].startswith(b"s OK")
        b.send(b"i IDLE\r\n")
        assert b.line().startswith(b"+ ")
        msg = b"From: a@w.test\r\nSubject: across\r\n\r\nhello\r\n"
        a.send(b"p APPEND INBOX {%d}\r\n" % len(msg))
        assert a.line().startswith(b"+")
        a.send(msg + b"\r\n")
        assert a.line().startswith(b"p OK")
        t0 = time.monotonic()
        b.sock.settimeout(10)
        assert b.line() == b"* 1 EXISTS"
        woke = time.monotonic() - t0
        # flags and expunges made in one worker reach the other's selected session too
        assert a.imap(b"s", b"SELECT INBOX")[1].startswith(b"s OK")
        assert a.imap(b"f", b"STORE 1 +FLAGS (\\Flagged)")[1].startswith(b"f OK")
        ln = next_matching(b, lambda x: x.startswith(b"* 1 FETCH"))
        assert b"\\Flagged" in ln, ln
        assert a.imap(b"x", b"STORE 1 +FLAGS (\\Deleted)")[1].startswith(b"x OK")
        assert a.imap(b"e", b"EXPUNGE")[1].startswith(b"e OK")
        next_matching(b, lambda x: x == b"* 1 EXPUNGE")
        b.send(b"DONE\r\n")
        assert b.imap(b"n", b"NOOP")[1].startswith(b"n OK") or True
    # the datagram wake-up, not the 0.5 s mtime poll: a busy machine may still take a while
    assert woke < 5.0, woke


def test_notify_rename_across_workers(inst: Instance) -> None:
    """RFC 5465 §5.4: a rename in one worker reaches a NOTIFY session in the other as one LIST with
    OLDNAME (the workers' bus wakes it; it reads the rename from the index's rename log, with the
    names, under the user lock); so do renames sent at once, and a creation of the old name after."""
    user = add_cheap_user(inst, "notify@w.test")
    a, b = imap_pair(inst, user, "127.0.0.38")
    with a, b:
        assert b.imap(b"n", b"NOTIFY SET (PERSONAL (MailboxName))")[1].startswith(b"n OK")
        b.sock.settimeout(10)
        assert a.imap(b"c", b"CREATE Alt")[1].startswith(b"c OK")
        assert b.line() == b'* LIST () "." "Alt"'
        assert a.imap(b"r", b"RENAME Alt Neu")[1].startswith(b"r OK")
        assert b.line() == b'* LIST () "." "Neu" ("OLDNAME" ("Alt"))'
        a.send(b"r1 RENAME Neu X1\r\nr2 RENAME X1 X2\r\nc2 CREATE Neu\r\n")
        assert [a.line()[:5] for _ in range(3)] == [b"r1 OK", b"r2 OK", b"c2 OK"]
        known = {"Neu": "Neu"}  # name -> the name the client knew it by
        while "Neu" not in known or "X2" not in known:
            m = re.fullmatch(rb'\* LIST \(\) "\." "(\w+)"(?: \("OLDNAME" \("(\w+)"\)\))?', b.line())
            assert m is not None  # no \NonExistent: nothing was deleted
            if m.group(2):
                known[m.group(1).decode()] = known.pop(m.group(2).decode())
            else:
                known[m.group(1).decode()] = m.group(1).decode()
        assert known == {"X2": "Neu", "Neu": "Neu"}


def test_changes_in_one_worker_reach_the_others_selected_session_at_the_next_command(inst: Instance) -> None:
    """A change made through the index in one worker (APPEND, STORE, EXPUNGE) is announced by the
    other worker at the end of any command (not only NOOP), read again from the index alone."""
    user = add_cheap_user(inst, "next@w.test")
    a, b = imap_pair(inst, user, "127.0.0.39")
    msg = b"Subject: next\r\n\r\nx\r\n"
    with a, b:
        assert a.imap(b"a", b"APPEND INBOX {%d+}\r\n" % len(msg) + msg)[1].startswith(b"a OK")
        u, t = b.imap(b"s", b"SELECT INBOX")
        assert t.startswith(b"s OK") and b"* 1 EXISTS" in u
        assert a.imap(b"a", b"APPEND INBOX {%d+}\r\n" % len(msg) + msg)[1].startswith(b"a OK")
        u, t = b.imap(b"f", b"UID FETCH 1 (FLAGS)")
        assert t.startswith(b"f OK") and b"* 2 EXISTS" in u, u
        assert a.imap(b"s", b"SELECT INBOX")[1].startswith(b"s OK")
        assert a.imap(b"x", b"STORE 1 +FLAGS.SILENT (\\Flagged \\Deleted)")[1].startswith(b"x OK")
        u, t = b.imap(b"f", b"UID FETCH 2 (FLAGS)")
        assert t.startswith(b"f OK") and any(ln.startswith(b"* 1 FETCH") and b"\\Flagged" in ln for ln in u), u
        assert a.imap(b"e", b"EXPUNGE")[1].startswith(b"e OK")
        u, t = b.imap(b"g", b"UID STORE 2 +FLAGS.SILENT (\\Seen)")  # UID commands allow an EXPUNGE
        assert t.startswith(b"g OK") and b"* 1 EXPUNGE" in u, u


def test_a_delivery_in_either_worker_reaches_a_selected_session_without_noop(inst: Instance) -> None:
    """A delivery writes files no index knows: the other worker is told so on the bus and reads the
    directory at its session's next command (here UID FETCH, polled a bounded number of times: the
    bus is a datagram that may arrive after the SMTP reply)."""
    user = add_cheap_user(inst, "deliv@w.test")
    with Line(inst.addr("imap"), "127.0.0.40") as c:
        assert c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1].startswith(b"l OK")
        assert c.imap(b"s", b"SELECT INBOX")[1].startswith(b"s OK")
        def sock(s: smtplib.SMTP) -> socket.socket:
            assert s.sock is not None
            return s.sock

        s1, s2 = spread(inst, lambda: smtplib.SMTP(*inst.addr("smtp"), timeout=10, source_address=("127.0.0.40", 0)),
                        sock, smtplib.SMTP.close)
        try:
            for i, s in enumerate((s1, s2), 1):
                s.sendmail("sender@example.net", [user], b"From: sender@example.net\r\nSubject: d\r\n\r\nx\r\n")
                for _ in range(50):
                    u, t = c.imap(b"f", b"UID FETCH 1:* (UID)")
                    assert t.startswith(b"f OK"), t
                    if b"* %d EXISTS" % i in u:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError(f"delivery {i} not announced")
        finally:
            s1.close()
            s2.close()


def test_uids_stay_unique_when_both_workers_append(inst: Instance) -> None:
    user = add_cheap_user(inst, "uids@w.test")
    a, b = imap_pair(inst, user, "127.0.0.32")
    n = 20

    def append(c: Line, tag: bytes) -> None:
        for i in range(n):
            msg = b"Subject: %s %d\r\n\r\nx\r\n" % (tag, i)
            c.send(tag + b" APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n")
            assert c.line().startswith(tag + b" OK")

    with a, b:
        together(lambda: append(a, b"A"), lambda: append(b, b"B"), timeout=60)
        for c in (a, b):
            untagged, tagged = c.imap(b"s", b"SELECT INBOX")
            assert tagged.startswith(b"s OK") and b"* %d EXISTS" % (2 * n) in untagged, untagged
            untagged, tagged = c.imap(b"u", b"UID SEARCH ALL")
            uids = [int(x) for x in untagged[0].split()[2:]]
            assert len(uids) == len(set(uids)) == 2 * n


def test_connection_limit_per_ip_counts_both_workers(inst: Instance) -> None:
    src = "127.0.0.33"

    def connect() -> Line:
        c = Line(inst.addr("smtp"), src)
        assert c.reply().startswith(b"220 "), "refused before the limit"
        return c

    a, b = spread(inst, connect, lambda c: c.sock, Line.close)
    with a, b, connect(), connect():  # the third and fourth from this IP, on either worker
        for _ in range(4):  # the fifth is refused whichever worker accepts it
            with Line(inst.addr("smtp"), src) as extra:
                assert extra.reply().startswith(b"421 4.7.0")
    time.sleep(0.3)
    with Line(inst.addr("smtp"), src) as again:  # released everywhere once closed
        assert again.reply().startswith(b"220 ")


def test_login_throttle_is_shared(inst: Instance) -> None:
    user = add_cheap_user(inst, "throttle@w.test")
    src = "127.0.0.34"

    def connect() -> Line:
        c = Line(inst.addr("imap"), src)
        assert c.line().startswith(b"* OK")
        return c

    a, b = spread(inst, connect, lambda c: c.sock, Line.close)
    with a, b:
        for i, c in enumerate((a, b)):  # two failures, one in each worker
            r = c.imap(b"x%d" % i, b"LOGIN " + user.encode() + b" wrong")[1]
            assert r.startswith(b"x%d NO" % i), r
        # the third (a's second): the IP has had max_failures = 3, counted across both workers
        a.send(b"x3 LOGIN " + user.encode() + b" wrong\r\n")
        assert a.line().startswith(b"* BYE [UNAVAILABLE] Too many failed logins")
    # refused on every worker now, even with the right password
    for _ in range(4):
        with Line(inst.addr("imap"), src) as c:
            first = c.line()
            if first.startswith(b"* OK"):
                first = c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1]
            assert b"BYE" in first or b"NO" in first, first


def test_pop3_maildrop_lock_across_workers(inst: Instance) -> None:
    user = add_cheap_user(inst, "pop@w.test")

    def connect() -> Line:
        c = Line(inst.addr("pop3"), "127.0.0.35")
        assert c.line().startswith(b"+OK")
        return c

    a, b = spread(inst, connect, lambda c: c.sock, Line.close)
    with a, b:
        assert a.cmd(b"USER " + user.encode()).startswith(b"+OK")
        assert a.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
        assert b.cmd(b"USER " + user.encode()).startswith(b"+OK")
        r = b.cmd(b"PASS " + PASSWORD.encode())
        assert r.startswith(b"-ERR [IN-USE]"), r
        assert a.cmd(b"QUIT").startswith(b"+OK")
    with connect() as c:
        assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
        assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")


def test_daily_sending_limit_across_workers(inst: Instance) -> None:
    user = add_cheap_user(inst, "daily@w.test")

    def connect() -> smtplib.SMTP:
        s = smtplib.SMTP(*inst.addr("submission"), timeout=10, source_address=("127.0.0.36", 0))
        s.login(user, PASSWORD)
        return s

    def sock(s: smtplib.SMTP) -> socket.socket:
        assert s.sock is not None
        return s.sock

    a, b = spread(inst, connect, sock, smtplib.SMTP.close)
    replies = []
    for s in (a, b, a):
        code, text = s.docmd("MAIL", f"FROM:<{user}>")
        if code == 250:
            s.rcpt("x@defer.test")
            code, text = s.data(f"From: {user}\r\nSubject: limit\r\n\r\nx\r\n".encode())
        replies.append((code, text))
    a.close()
    b.close()
    assert [c for c, _ in replies] == [250, 250, 450], replies


def test_kill_one_worker_under_load_loses_nothing_acknowledged(inst: Instance) -> None:
    user = add_cheap_user(inst, "load@w.test")
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 400:
            try:
                with smtplib.SMTP(*inst.addr("smtp"), timeout=10, source_address=(f"127.0.1.{k + 1}", 0)) as s:
                    for _ in range(5):
                        tag = f"m{k}-{i}"
                        i += 1
                        s.sendmail("sender@example.net", [user],
                                   f"From: sender@example.net\r\nSubject: {tag}\r\n\r\n{tag}\r\n".encode())
                        with lock:
                            acked.append(tag)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the killed worker's connections: no 250, so nothing owed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 20, 60, "mail flowing")
    victim = inst.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(acked) >= 60, 60, "mail flowing after the kill")
    stop.set()
    for t in threads:
        t.join(60)
    wait_for(lambda: inst.worker_pids().get(1, victim) != victim, 30, "the worker restarted")
    assert f"worker 1 (pid {victim}) died (signal SIGKILL)" in inst.log.read_text()
    got: set[str] = set()
    for m in inst.messages(user):
        for ln in m.split(b"\r\n"):
            if ln.startswith(b"Subject: "):
                got.add(ln[9:].decode())
    missing = set(acked) - got
    assert not missing, f"{len(missing)} acknowledged messages lost of {len(acked)}: {sorted(missing)[:5]}"
    with Line(inst.addr("smtp"), "127.0.0.37") as c:  # both workers serve again
        assert c.reply().startswith(b"220 ")


def test_stop_reaches_every_worker(tmp_path: Path) -> None:
    i = Instance(tmp_path, "s.test", workers=2)
    i.start()
    wait_for(lambda: len(i.worker_pids()) == 2, 20, "two workers")
    pids = list(i.worker_pids().values())
    assert i.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    assert not (tmp_path / "run" / "workers").exists()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    i = Instance(tmp_path, "f.test", workers=2, extra_config=(
        '[antispam]\nrspamd = "http://127.0.0.1:9"\nrspamd_controller = "http://127.0.0.1:9"\n'
        'rspamd_password_file = "missing"\n'))
    with pytest.raises(AssertionError, match="exited with 1"):
        i.start()
    assert i.proc is not None and i.proc.wait(10) == 1
    log = i.log.read_text()
    assert "rspamd_password_file: cannot read" in log and "failed to start" in log
    i.logf.close()


def test_port25_rates_count_both_workers(tmp_path: Path) -> None:
    """`[antispam]` per-minute rates of port 25 count every worker's connections and messages: with
    connections known to be on both workers, exactly the limit is let in (per-worker counts would
    let one worker's share in on top of the other's)."""
    conns, msgs = 12, 3
    i = Instance(tmp_path, "r.test", workers=2, extra_config=(
        f"[antispam]\nmax_connections_per_minute = {conns}\nmax_messages_per_minute = {msgs}\n"))
    i.start()
    try:
        wait_for(lambda: len(i.worker_pids()) == 2, 20, "two workers")
        src = "127.0.0.38"
        used = [0]

        def connect() -> Line:
            used[0] += 1
            c = Line(i.addr("smtp"), src)
            assert c.reply().startswith(b"220 "), "refused before the limit"
            return c

        a, b = spread(i, connect, lambda c: c.sock, Line.close, tries=conns)
        with a, b:
            for c in (a, b):
                assert c.smtp(b"EHLO client.example").startswith(b"250")
            replies = [c.smtp(b"MAIL FROM:<s@example.net>")[:3] + (c.smtp(b"RSET")[:0]) for c in (a, b, a, b)]
            assert replies == [b"250", b"250", b"250", b"451"], replies  # 3 a minute, whichever worker
            accepted = used[0]
            for _ in range(conns + 2):  # connect until refused, on whichever worker
                with Line(i.addr("smtp"), src) as c:
                    r = c.reply()
                if not r.startswith(b"220 "):
                    assert r.startswith(b"421 "), r
                    break
                accepted += 1
            assert accepted == conns, (accepted, conns)
    finally:
        i.stop()


def test_reload_hands_a_new_listener_to_both_workers(inst: Instance) -> None:
    """A listener removed, then added back, by a reload: the supervisor closes and binds it and
    hands the socket to each worker (no restart: a session opened before goes on)."""
    good = inst.config.read_text()
    block = f'[listeners.pop3]\naddress = "{inst.address}"\nport = {inst.port("pop3")}\n'
    assert block in good

    def reload() -> None:
        before = inst.log.read_text().count("reloaded ")
        assert inst.cli("reload").returncode == 0
        wait_for(lambda: inst.log.read_text().count("reloaded ") >= before + 2, 20, "both workers reloaded")

    user = add_cheap_user(inst, "hand@w.test")
    a, b = imap_pair(inst, user, "127.0.0.39")
    with a, b:
        try:
            inst.config.write_text(good.replace(block, ""))
            reload()
            for _ in range(4):  # closed in both workers and in the supervisor
                with pytest.raises(OSError):
                    socket.create_connection(inst.addr("pop3"), timeout=5).close()
        finally:
            inst.config.write_text(good)
        reload()

        def connect() -> Line:
            c = Line(inst.addr("pop3"), "127.0.0.40")
            assert c.line().startswith(b"+OK")
            return c

        p, q = spread(inst, connect, lambda c: c.sock, Line.close)  # served by both workers
        p.close()
        q.close()
        for c in (a, b):  # the IMAP sessions from before the reloads go on
            assert c.imap(b"n", b"NOOP")[1].startswith(b"n OK")


def test_metrics_are_summed_over_workers(tmp_path: Path) -> None:
    """/metrics (served by worker 0) reports every worker's counts: SMTP load on connections known
    to be on each worker moves the totals by exactly that load (and `postier status`'s last hour
    adds up both); a worker killed with SIGKILL takes its open sessions out of the gauge but never
    lowers a counter."""
    from tests.test_metrics_server import get, parse, scrape

    port = free_port()
    i = Instance(tmp_path, "m.test", workers=2, extra_config=(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\nallow = ["127.0.0.1/32"]\n'))
    i.add_user("u@m.test")
    i.start()
    try:
        wait_for(lambda: len(i.worker_pids()) == 2, 20, "two workers")
        before = parse(scrape(port, token=None)[1])
        opened = [0]

        def connect() -> smtplib.SMTP:
            opened[0] += 1
            return smtplib.SMTP(*i.addr("smtp"), timeout=10)

        def sock(s: smtplib.SMTP) -> socket.socket:
            assert s.sock is not None
            return s.sock

        a, b = spread(i, connect, sock, smtplib.SMTP.close)
        per = 3
        for s in (a, b):
            for k in range(per):
                s.sendmail("x@remote.test", ["u@m.test"], b"Subject: m%d\r\n\r\nx\r\n" % k)
        mid = parse(scrape(port, token=None)[1])

        def moved(after: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
            return get(after, name, **labels) - get(before, name, **labels)

        assert moved(mid, "postier_messages_received_total", role="smtp") == 2 * per
        assert moved(mid, "postier_local_deliveries_total", result="delivered") == 2 * per
        assert moved(mid, "postier_connections_total", role="smtp", result="accepted") == opened[0]
        assert get(mid, "postier_sessions_active", role="smtp") == 2  # one open in each worker

        def last_hour() -> object:  # `postier status`: each worker's file, added up
            data = stats.read(tmp_path)
            return data.get("last_hour") if data is not None else None

        wait_for(lambda: isinstance(h := last_hour(), dict) and h.get("accepted") == 2 * per, 10,
                 "both workers' counts in the last hour")
        if i.worker_of(sock(a)) != i.worker_pids()[0]:
            a, b = b, a
        victim = i.worker_of(sock(b))  # worker 1's (worker 0 serves /metrics)
        assert victim == i.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: i.worker_pids().get(1, victim) != victim, 30, "worker 1 restarted")
        after = parse(scrape(port, token=None)[1])
        assert moved(after, "postier_messages_received_total", role="smtp") == 2 * per  # not lowered
        assert moved(after, "postier_connections_total", role="smtp", result="accepted") == opened[0]
        assert get(after, "postier_sessions_active", role="smtp") == 1  # a's; b's worker is gone
        a.quit()
        b.close()
    finally:
        i.stop()


def test_default_is_one_worker_per_core(tmp_path: Path) -> None:
    """`[server] workers` defaults to 0: one per CPU core this process may use (quickstart leaves
    the key commented out)."""
    from postier.config import load_config
    from postier.server.supervisor import worker_count

    from tests.harness import run_cli
    run_cli(None, "quickstart", "--domain", "d.test", "--data-dir", str(tmp_path), "--quiet", "--allow-root")
    text = (tmp_path / "postier.toml").read_text()
    assert "\n# workers = 0" in text and "\nworkers =" not in text
    cfg = load_config(tmp_path / "postier.toml")
    assert cfg.server.workers == 0
    assert worker_count(cfg) == (os.process_cpu_count() or 1)


def test_per_user_limits_count_both_workers(tmp_path: Path) -> None:
    """`[imap] max_connections_per_user` and POP3's LOGIN-DELAY hold across workers: sessions known
    to be on different workers count together, and a POP3 login in one worker delays the next in
    the other."""
    i = Instance(tmp_path, "u.test", workers=2, extra_config=(
        "[auth]\nallow_plaintext = true\n[imap]\nmax_connections_per_user = 2\n[pop3]\nlogin_delay = 600\n"))
    i.start()
    try:
        wait_for(lambda: len(i.worker_pids()) == 2, 20, "two workers")
        user = add_cheap_user(i, "u@u.test")
        a, b = imap_pair(i, user, "127.0.0.41")  # two sessions, one in each worker
        with a, b:
            for _ in range(3):  # a third is refused whichever worker takes it
                with Line(i.addr("imap"), "127.0.0.41") as c:
                    assert c.line().startswith(b"* OK")
                    t = c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1]
                    assert t.startswith(b"l NO [LIMIT]"), t
            assert b.imap(b"o", b"LOGOUT")[1].startswith(b"o OK")
        with Line(i.addr("imap"), "127.0.0.41") as c:  # released in the other worker: room again
            assert c.line().startswith(b"* OK")
            assert c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1].startswith(b"l OK")

        def connect() -> Line:
            c = Line(i.addr("pop3"), "127.0.0.42")
            assert c.line().startswith(b"+OK")
            return c

        p, q = spread(i, connect, lambda c: c.sock, Line.close)
        with p, q:
            assert p.cmd(b"USER " + user.encode()).startswith(b"+OK")
            assert p.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
            assert p.cmd(b"QUIT").startswith(b"+OK")
            assert q.cmd(b"USER " + user.encode()).startswith(b"+OK")
            r = q.cmd(b"PASS " + PASSWORD.encode())  # the other worker: logged in too recently
            assert r.startswith(b"-ERR [LOGIN-DELAY]"), r
    finally:
        i.stop()


def test_vacation_replies_once_when_both_workers_deliver_at_once(inst: Instance) -> None:
    """RFC 5230 §4.1 across processes: deliveries to one Sieve user in both workers at the same
    moment, from one sender, make one vacation reply (the tracking is held across workers)."""
    away, sender = add_cheap_user(inst, "away@w.test"), add_cheap_user(inst, "asker@w.test")
    inst.cli("sieve", "put", away, "away", "-", stdin='require ["vacation"];\nvacation :days 1 "I am away.";\n')
    inst.cli("sieve", "activate", away, "away")

    def connect() -> smtplib.SMTP:
        s = smtplib.SMTP(*inst.addr("smtp"), timeout=30, source_address=("127.0.0.37", 0))
        s.ehlo("client.test")
        return s

    def sock(s: smtplib.SMTP) -> socket.socket:
        assert s.sock is not None
        return s.sock

    rounds = 5
    a, b = spread(inst, connect, sock, smtplib.SMTP.close)
    start = threading.Barrier(2)

    def send(s: smtplib.SMTP, side: str) -> None:
        for i in range(rounds):
            start.wait(10)  # both workers deliver at the same moment
            data = f"From: <{sender}>\r\nTo: <{away}>\r\nSubject: question {side}{i}\r\n\r\nthere?\r\n"
            s.sendmail(sender, [away], data.encode())

    try:
        together(lambda: send(a, "a"), lambda: send(b, "b"), timeout=60)
    finally:
        a.close()
        b.close()
    wait_for(lambda: len(inst.messages(away)) == 2 * rounds, 30, "every message delivered")
    wait_for(lambda: any(b"I am away." in m for m in inst.messages(sender)), 30, "the vacation reply")
    time.sleep(1.0)  # a second reply, if one were due, would be queued by now
    assert sum(b"I am away." in m for m in inst.messages(sender)) == 1
