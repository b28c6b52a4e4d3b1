"""Limits on every listener, measured against a real server with small configured values:
connection limits (global and per IP), slowloris and slow transfers, TLS handshake timeouts, the
login penalty shared by SMTP, IMAP and POP3 per client IP, the per-user daily sending limit, junk
command counts and the pre-login session bound. docs/security.md points here."""

from __future__ import annotations

import base64
import select
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.concurrency import together
from tests.dnsserver import DNSServer
from tests.harness import Instance

from .conftest import PASSWORD, Line, add_cheap_user

COMMAND_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 1.0
SESSION_TIMEOUT = 4.0
FAILURE_DELAY = 1.0  # long enough that a busy machine cannot blur "slowed" and "not slowed"
CONFIG = f"""
[limits]
command_timeout = {COMMAND_TIMEOUT}
tls_handshake_timeout = {HANDSHAKE_TIMEOUT}
idle_timeout = 30.0
session_timeout = {SESSION_TIMEOUT}
max_connections = 12
max_connections_per_ip = 3
max_errors = 4
[auth]
failure_delay = {FAILURE_DELAY}
max_failures = 3
allow_plaintext = true
[imap]
max_connections_per_user = 100
[submission]
max_messages_per_day = 2
[mailauth]
spf = false
dkim_verify = false
dmarc = false
"""

GREETING = {"smtp": b"220 ", "imap": b"* OK", "pop3": b"+OK", "managesieve": b'"IMPLEMENTATION"'}
BUSY = {"smtp": b"421 4.7.0", "imap": b"* BYE", "pop3": b"-ERR [SYS/TEMP]"}


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    with DNSServer() as dns:
        dns.servfail("defer.test")
        root: Path = tmp_path_factory.mktemp("limits")
        i = Instance(root, "h.test", extra_config=CONFIG + f'[dns]\nnameservers = ["{dns.nameserver}"]\n')
        i.start()
        try:
            yield i
        finally:
            i.stop()


def greet(inst: Instance, role: str, source: str, timeout: float = 10.0) -> Line:
    c = Line(inst.addr(role), source, timeout)
    first = c.reply() if role == "smtp" else c.line()
    assert first.startswith(GREETING[role]), first
    while role == "managesieve" and not first.startswith(b"OK"):  # RFC 5804 §1.7: capabilities, then OK
        first = c.line()
    return c


def login(c: Line, role: str, user: str, password: str = PASSWORD) -> bytes:
    if role == "imap":
        return c.imap(b"L", b"LOGIN " + user.encode() + b" " + password.encode())[1]
    if role == "managesieve":  # [auth] allow_plaintext holds here as in the other protocols
        return c.cmd(b'AUTHENTICATE "PLAIN" "' + base64.b64encode(f"\0{user}\0{password}".encode()) + b'"')
    assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
    return c.cmd(b"PASS " + password.encode())


# -- connection limits --------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["smtp", "imap", "pop3"])
def test_connection_limits_per_ip_and_global(inst: Instance, role: str) -> None:
    held: list[Line] = []
    try:
        held += [greet(inst, role, "127.0.0.21") for _ in range(3)]
        with Line(inst.addr(role), "127.0.0.21") as extra:  # the 4th from one IP: refused at once
            assert extra.line().startswith(BUSY[role])
            assert extra.closed_within(5)[0] is not None
        for src in ("127.0.0.22", "127.0.0.23", "127.0.0.24"):  # other IPs are still served...
            held += [greet(inst, role, src) for _ in range(3)]
        with Line(inst.addr(role), "127.0.0.25") as extra:  # ...up to the global limit (12)
            assert extra.line().startswith(BUSY[role])
        held.pop().close()  # a slot frees up: the accept loop serves the next client
        deadline = time.monotonic() + 5
        while True:
            with Line(inst.addr(role), "127.0.0.25") as c:
                first = c.line()
            if first.startswith(GREETING[role]) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert first.startswith(GREETING[role]), first
    finally:
        for c in held:
            c.close()
    time.sleep(0.3)  # let the server see the closes before the next test counts connections


# -- slowloris: a command dripped byte by byte ------------------------------------------------------

def _drip(c: Line, data: bytes, interval: float, limit: float) -> float | None:
    """Send one byte every `interval` s; the seconds until the server closed, or None."""
    start = time.monotonic()
    for b in data * 100:
        if time.monotonic() - start > limit:
            return None
        try:
            c.sock.send(bytes([b]))
        except OSError:
            return time.monotonic() - start
        r, _, _ = select.select([c.sock], [], [], interval)
        if r:
            try:
                if not c.sock.recv(65536):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def _honest(inst: Instance, role: str, source: str, user: str, stop: threading.Event,
            latencies: list[float]) -> None:
    c = greet(inst, role, source)
    try:
        if role != "smtp":
            assert b"OK" in login(c, role, user)
        for i in range(200):
            if stop.is_set():
                return
            t = time.monotonic()
            if role == "smtp":
                assert c.smtp(b"NOOP").startswith(b"250")
            elif role == "imap":
                assert c.imap(b"n%d" % i, b"NOOP")[1].startswith(b"n%d OK" % i)
            elif role == "managesieve":
                assert c.cmd(b"NOOP").startswith(b"OK")
            else:
                assert c.cmd(b"NOOP").startswith(b"+OK")
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)
    finally:
        c.close()


@pytest.mark.parametrize("role", ["smtp", "imap", "pop3", "managesieve"])
def test_slowloris_dropped_while_honest_client_keeps_latency(inst: Instance, role: str) -> None:
    user = add_cheap_user(inst, f"slow-{role}@h.test")
    latencies: list[float] = []
    stop = threading.Event()
    honest = threading.Thread(target=_honest, args=(inst, role, "127.0.0.42", user, stop, latencies))
    honest.start()
    try:
        with greet(inst, role, "127.0.0.41") as slow:
            dropped = _drip(slow, b"NOOP NOOP NOOP", 0.25, SESSION_TIMEOUT + 2)
    finally:
        stop.set()
        honest.join(10)
    assert latencies, "the honest client got no answer"
    assert max(latencies) < 1.0, f"honest client slowed down: {max(latencies):.2f}s"
    assert dropped is not None, "the slowloris client was never dropped"
    assert dropped < COMMAND_TIMEOUT + 1.5, f"dropped after {dropped:.1f}s, not by the command deadline"


def _slow_upload(c: Line, size: int, rate: float, limit: float) -> float | None:
    """Send `size` bytes at `rate` bytes/s in 50-byte pieces; seconds until the server closed."""
    return _drip_chunks(c, b"x" * 48 + b"\r\n", size // 50, 50 / rate, limit)


def _drip_chunks(c: Line, piece: bytes, n: int, interval: float, limit: float) -> float | None:
    start = time.monotonic()
    for _ in range(n):
        if time.monotonic() - start > limit:
            return None
        try:
            c.sock.send(piece)
        except OSError:
            return time.monotonic() - start
        r, _, _ = select.select([c.sock], [], [], interval)
        if r:
            try:
                data = c.sock.recv(65536)
            except OSError:
                return time.monotonic() - start
            if not data:
                return time.monotonic() - start
    return None


def test_imap_literal_below_min_data_rate_is_dropped(inst: Instance) -> None:
    user = add_cheap_user(inst, "literal@h.test")
    with greet(inst, "imap", "127.0.0.43") as c:
        assert b"OK" in login(c, "imap", user)
        msg = b"Subject: fast\r\n\r\n" + b"y" * 200_000 + b"\r\n"  # an honest upload passes
        c.send(b"A1 APPEND INBOX {%d}\r\n" % len(msg))
        assert c.line().startswith(b"+")
        c.send(msg + b"\r\n")
        assert c.line().startswith(b"A1 OK")
        c.send(b"A2 APPEND INBOX {20000}\r\n")
        assert c.line().startswith(b"+")
        dropped = _slow_upload(c, 20000, 150, 6)  # 150 B/s < min_data_rate 500 B/s
    assert dropped is not None and dropped < 4, dropped


def test_smtp_data_below_min_data_rate_is_dropped(inst: Instance) -> None:
    add_cheap_user(inst, "data@h.test")
    with greet(inst, "smtp", "127.0.0.44") as c:
        assert c.smtp(b"EHLO client.test").startswith(b"250")
        assert c.smtp(b"MAIL FROM:<a@remote.test>").startswith(b"250")
        assert c.smtp(b"RCPT TO:<data@h.test>").startswith(b"250")
        assert c.smtp(b"DATA").startswith(b"354")
        dropped = _slow_upload(c, 20000, 150, 6)
    assert dropped is not None and dropped < 3.5, dropped


# -- TLS handshakes ------------------------------------------------------------------------------

def _silent_after(inst: Instance, role: str, partial_hello: bool) -> float | None:
    """Connect (and for plain roles, ask for STARTTLS), then stall the handshake."""
    c = Line(inst.addr(role), "127.0.0.45")
    try:
        if role == "smtp":
            c.reply()
            c.smtp(b"EHLO x.test")
            assert c.smtp(b"STARTTLS").startswith(b"220")
        elif role == "imap":
            c.line()
            assert c.imap(b"S", b"STARTTLS")[1].startswith(b"S OK")
        elif role == "pop3":
            c.line()
            assert c.cmd(b"STLS").startswith(b"+OK")
        if partial_hello:
            c.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        return c.closed_within(HANDSHAKE_TIMEOUT + 2.5)[0]
    finally:
        c.close()


@pytest.mark.parametrize("partial", [False, True], ids=["silent", "partial-hello"])
def test_tls_handshake_timeout(inst: Instance, partial: bool) -> None:
    roles = ["submissions", "imaps", "pop3s", "smtp", "imap", "pop3"]
    results: dict[str, float | None] = {}

    def run(role: str) -> None:
        results[role] = _silent_after(inst, role, partial)

    together(*(lambda r=r: run(r) for r in roles), timeout=10)  # (`partial` is this test's parameter)
    slow = {r: v for r, v in results.items() if v is None or v > HANDSHAKE_TIMEOUT + 1.5}
    assert len(results) == len(roles) and not slow, results


# -- the login penalty, shared across protocols per IP -----------------------------------------

def _timed(fn, *args):  # noqa: ANN001, ANN202
    t = time.monotonic()
    r = fn(*args)
    return r, time.monotonic() - t


def test_auth_failures_penalize_the_ip_on_every_protocol(inst: Instance) -> None:
    user = add_cheap_user(inst, "victim@h.test")
    bad, good = "127.0.0.51", "127.0.0.52"
    with greet(inst, "imap", bad) as c:
        r1, t1 = _timed(c.imap, b"a", b"LOGIN " + user.encode() + b" wrong1")
        r2, t2 = _timed(c.imap, b"b", b"LOGIN " + user.encode() + b" wrong2")
    assert r1[1].startswith(b"a NO [AUTHENTICATIONFAILED]") and r2[1].startswith(b"b NO")
    assert t1 >= FAILURE_DELAY * 0.9 and t2 >= 2 * FAILURE_DELAY * 0.9, (t1, t2)  # growing delay
    # the third failure, on POP3 this time: slowed further, then the IP is cut off
    with greet(inst, "pop3", bad) as c:
        assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
        r3, t3 = _timed(c.cmd, b"PASS wrong3")
        assert r3.startswith(b"-ERR") and t3 >= 3 * FAILURE_DELAY * 0.9, (r3, t3)
        assert c.closed_within(3)[0] is not None
    # now refused everywhere, even with the right password
    with Line(inst.addr("imap"), bad) as c:
        assert c.line().startswith(b"* BYE")
    with Line(inst.addr("submission"), bad) as c:
        assert c.reply().startswith(b"421")
    with greet(inst, "pop3", bad) as c:
        assert login(c, "pop3", user).startswith(b"-ERR [SYS/TEMP]")
    # ...while another IP is neither refused nor slowed
    with greet(inst, "imap", good) as c:
        r, t = _timed(c.imap, b"a", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())
        assert r[1].startswith(b"a OK") and t < FAILURE_DELAY, (r, t)
    with smtplib.SMTP(*inst.addr("submission"), timeout=10, source_address=(good, 0)) as s:
        s.login(user, PASSWORD)
    # port 25 has no AUTH and no penalty: the MX keeps accepting mail from that IP
    with greet(inst, "smtp", bad) as c:
        assert c.smtp(b"EHLO x.test").startswith(b"250")


def test_identical_failure_for_unknown_user_and_wrong_password(inst: Instance) -> None:
    user = add_cheap_user(inst, "known@h.test")
    replies = []
    for i, (who, src) in enumerate([(user, "127.0.0.53"), ("nobody@h.test", "127.0.0.54")]):
        with smtplib.SMTP(*inst.addr("submission"), timeout=10, source_address=(src, 0)) as s:
            s.ehlo()
            replies.append(s.docmd("AUTH", "PLAIN " + __import__("base64").b64encode(
                f"\0{who}\0wrong{i}".encode()).decode()))
    assert replies[0] == replies[1] and replies[0][0] == 535, replies


# -- per-user sending limit ----------------------------------------------------------------------

def test_daily_sending_limit_is_per_user(inst: Instance) -> None:
    a = add_cheap_user(inst, "sender-a@h.test")
    b = add_cheap_user(inst, "sender-b@h.test")

    def send(user: str) -> tuple[int, bytes]:
        with smtplib.SMTP(*inst.addr("submission"), timeout=10, source_address=("127.0.0.55", 0)) as s:
            s.login(user, PASSWORD)
            code, text = s.docmd("MAIL", f"FROM:<{user}>")
            if code != 250:
                return code, text
            s.rcpt("x@defer.test")
            return s.data(f"From: {user}\r\nSubject: limit\r\n\r\nx\r\n".encode())

    assert send(a)[0] == 250 and send(a)[0] == 250
    code, text = send(a)  # max_messages_per_day = 2
    assert code == 450 and text.startswith(b"4.7.1"), (code, text)
    assert send(b)[0] == 250  # another user from the same IP is not affected


# -- junk commands ------------------------------------------------------------------------------

def test_imap_invalid_commands_end_the_session(inst: Instance) -> None:
    with greet(inst, "imap", "127.0.0.61") as c:
        for i in range(3):
            assert b"BAD" in c.cmd(b"j%d FROBNICATE" % i)
        assert c.imap(b"n", b"NOOP")[1].startswith(b"n OK")  # a good command forgives
        for i in range(3):
            assert b"BAD" in c.cmd(b"k%d FROBNICATE" % i)
        c.send(b"\x00\x01garbage\r\n")  # the 4th in a row (max_errors = 4)
        elapsed, rest = c.closed_within(3)
        assert elapsed is not None and b"* BYE Too many invalid commands" in rest, rest


def test_pop3_invalid_commands_end_the_session(inst: Instance) -> None:
    with greet(inst, "pop3", "127.0.0.62") as c:
        for _ in range(3):
            assert c.cmd(b"FROB").startswith(b"-ERR")
        assert c.cmd(b"FROB").startswith(b"-ERR Too many errors")
        assert c.closed_within(3)[0] is not None


# -- the session bound before login --------------------------------------------------------------

def test_session_bound_before_login_only(inst: Instance) -> None:
    user = add_cheap_user(inst, "longlived@h.test")
    out: dict[str, float | None] = {}

    def chatter(role: str, authenticated: bool) -> None:
        c = greet(inst, role, "127.0.0.66" if authenticated else "127.0.0.63")
        key = role + (" authenticated" if authenticated else "")
        try:
            if authenticated:
                assert b"OK" in login(c, role, user)
            start = time.monotonic()
            for i in range(200):  # never idle, never mid-command: only the session bound applies
                if time.monotonic() - start > SESSION_TIMEOUT + 2:
                    out[key] = None
                    return
                try:
                    c.send(b"x%d NOOP\r\n" % i if role == "imap" else b"NOOP\r\n" if authenticated
                           or role == "managesieve" else b"CAPA\r\n")
                    r, _, _ = select.select([c.sock], [], [], 0.4)
                    data = c.sock.recv(65536) if r else b"-"
                except OSError:
                    data = b""
                if not data or b"BYE" in data or b"-ERR" in data:
                    out[key] = time.monotonic() - start
                    return
                time.sleep(0.1)
            out[key] = None
        finally:
            c.close()

    roles = ("imap", "pop3", "managesieve")
    together(*(partial(chatter, r, a) for r in roles for a in (False, True)), timeout=15)
    assert all(out[r] is not None for r in roles), out
    assert all(out[r + " authenticated"] is None for r in roles), out


def test_idle_port_scan_does_not_leak_sessions(inst: Instance) -> None:
    """Connect-and-close storms (port scanners) leave no session behind: the limits stay usable."""
    for _ in range(60):
        for role in ("smtp", "imap", "pop3"):
            with socket.create_connection(inst.addr(role), timeout=5, source_address=("127.0.0.64", 0)):
                pass
    time.sleep(0.3)
    for role in ("smtp", "imap", "pop3"):
        held = [greet(inst, role, "127.0.0.64") for _ in range(3)]  # the per-IP limit is free again
        for c in held:
            c.close()
        time.sleep(0.2)


def test_imaps_with_bad_client_hello_is_closed(inst: Instance) -> None:
    with Line(inst.addr("imaps"), "127.0.0.65") as c:
        c.send(b"GET / HTTP/1.0\r\n\r\n")  # not TLS at all
        assert c.closed_within(3)[0] is not None
    ctx = inst.client_ssl_context()
    with socket.create_connection(inst.addr("imaps"), timeout=5) as s, ctx.wrap_socket(s) as t:
        assert t.recv(100).startswith(b"* OK")  # and the listener still works
    assert isinstance(ctx, ssl.SSLContext)


def test_unknown_user_costs_the_same_password_check(tmp_path: Path) -> None:
    """No timing oracle: an unknown user is verified against a dummy hash of the same cost."""
    from postier.accounts import Accounts

    acc = Accounts(tmp_path / "a.sqlite")
    acc.add_domain("t.test")
    acc.add_user("real@t.test", "correct horse")

    def cost(address: str) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            assert acc.verify_password(address, "wrong password") is None
            times.append(time.perf_counter() - t)
        return sorted(times)[1]

    known, unknown = cost("real@t.test"), cost("ghost@t.test")
    assert 0.5 < unknown / known < 2.0, (known, unknown)
