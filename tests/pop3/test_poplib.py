"""The POP3 listeners end to end with Python's poplib and raw sockets: STLS on the pop3 port, implicit
TLS on pop3s, USER/PASS and SASL, the maildrop lock, UPDATE-only deletion, \\Seen for IMAP, UIDL
stability, streaming of large messages."""

from __future__ import annotations

import base64
import fcntl
import imaplib
import os
import poplib
import socket
import ssl
import time

import pytest

from postier.proto.sasl import ScramClient
from postier.server.pop3 import LOCK_NAME
from tests.harness import Instance
from tests.pop3.conftest import (
    PASSWORD,
    Raw,
    deliver,
    imap_uidl,
    login_retrying,
    maildir_files,
    new_user,
    pop3s,
    retr_text,
    stored,
    subject_of,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- port 110: nothing secret before TLS (RFC 2595, RFC 2449 §8.1 / RFC 3206 [AUTH]) -----------------

def test_no_credentials_before_stls(pop: Instance) -> None:
    p = poplib.POP3(*pop.addr("pop3"), timeout=20)
    try:
        assert p.getwelcome() == b"+OK mail.a.test POP3 server ready"
        capa = p.capa()
        assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
        for command in ("USER u1@a.test", "PASS secret", "AUTH PLAIN " + b64(b"\0u1@a.test\0x"), "AUTH"):
            with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] Plaintext"):
                p._shortcmd(command)
        with pytest.raises(poplib.error_proto, match="not valid in this state"):
            p.stat()
        assert p.quit().startswith(b"+OK")
    finally:
        p.close()


def test_stls_then_user_pass(pop: Instance) -> None:
    user = new_user(pop)
    raw = deliver(pop, user, "stls one", b"line\r\n.starts with a dot\r\n..two dots\r\n")
    p = poplib.POP3(*pop.addr("pop3"), timeout=20)
    try:
        assert p.stls(pop.client_ssl_context()).startswith(b"+OK")
        capa = p.capa()
        assert "STLS" not in capa and "USER" in capa
        assert capa["SASL"] == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
        assert capa["EXPIRE"] == ["NEVER"] and "LOGIN-DELAY" not in capa
        with pytest.raises(poplib.error_proto, match="TLS already active"):
            p._shortcmd("STLS")
        p.user(user)
        assert p.pass_(PASSWORD) == b"+OK Maildrop has 1 messages (%d octets)" % len(raw)
        assert p.stat() == (1, len(raw))
        _, lines, _ = p.retr(1)
        assert retr_text(lines) == raw
        p.quit()
    finally:
        p.close()


def test_stls_discards_injected_commands(pop: Instance) -> None:
    user = new_user(pop)
    for separate in (False, True):
        r = Raw(pop, "pop3")
        try:
            assert r.line().startswith(b"+OK")
            injected = b"USER " + user.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
            if separate:  # the injection may arrive in the same read as STLS or just after it
                r.send(b"STLS\r\n")
                time.sleep(0.05)
                r.send(injected)
            else:
                r.send(b"STLS\r\n" + injected)
            assert r.line() == b"+OK Begin TLS negotiation"
            if separate:
                try:
                    r.starttls()
                except (ssl.SSLError, ConnectionError):
                    continue  # the server took the injected bytes for its TLS handshake: also safe
            else:
                r.starttls()
            # Nothing injected survived: PASS is refused for want of USER, and we are not logged in.
            assert r.cmd(b"PASS " + PASSWORD.encode()) == b"-ERR Send USER first"
            assert r.cmd(b"STAT") == b"-ERR Command not valid in this state"
            r.cmd(b"QUIT")
        finally:
            r.close()


# -- port 995 and SASL (RFC 8314, RFC 5034, RFC 4616, RFC 7677) ---------------------------------------

def test_pop3s_auth_plain_login_scram(pop: Instance) -> None:
    user = new_user(pop)
    deliver(pop, user, "sasl")
    p = pop3s(pop)
    try:
        assert "USER" in p.capa() and "STLS" not in p.capa()
        assert p._shortcmd("AUTH PLAIN " + b64(f"\0{user}\0{PASSWORD}".encode())).startswith(
            b"+OK Maildrop has 1 messages")
        assert p.stat()[0] == 1
        p.quit()
    finally:
        p.close()
    p = pop3s(pop)
    try:  # AUTH LOGIN with challenges, and PLAIN without an initial response
        assert p._shortcmd("AUTH LOGIN").startswith(b"+ ")
        assert p._shortcmd(b64(user.encode())).startswith(b"+ ")
        assert p._shortcmd(b64(PASSWORD.encode())).startswith(b"+OK Maildrop")
        p.quit()
    finally:
        p.close()
    p = pop3s(pop)
    try:  # SCRAM-SHA-256 (RFC 5034 §4: the server signature goes out as a last challenge)
        client = ScramClient(user, PASSWORD)
        challenge = p._shortcmd("AUTH SCRAM-SHA-256 " + b64(client.first_message()))
        assert challenge.startswith(b"+ ")
        final = p._shortcmd(b64(client.final_message(base64.b64decode(challenge[2:]))))
        assert client.verify_server_final(base64.b64decode(final[2:]))
        assert p._shortcmd("").startswith(b"+OK Maildrop has 1 messages")
        p.quit()
    finally:
        p.close()


def test_wrong_password_and_cancel(pop: Instance) -> None:
    user = new_user(pop)
    p = pop3s(pop)
    try:
        p.user(user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            p.pass_("wrong password")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            p._shortcmd("AUTH PLAIN " + b64(b"\0nobody@a.test\0" + PASSWORD.encode()))
        assert p._shortcmd("AUTH PLAIN").startswith(b"+ ")
        with pytest.raises(poplib.error_proto, match="cancelled"):
            p._shortcmd("*")
        p.user(user)
        assert p.pass_(PASSWORD).startswith(b"+OK")
        p.quit()
    finally:
        p.close()


def test_mbox_user_is_sys_perm(pop: Instance) -> None:
    user = new_user(pop, fmt="mbox")
    p = pop3s(pop)
    try:
        p.user(user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/PERM\]"):
            p.pass_(PASSWORD)
    finally:
        p.close()


# -- the maildrop (RFC 1939 §5-§8) -----------------------------------------------------------------

def order_of(p: poplib.POP3) -> list[str]:
    """The subjects of the maildrop in message-number order (UID order; not always arrival order)."""
    count = p.stat()[0]
    return [subject_of(retr_text(p.top(n, 0)[1])) for n in range(1, count + 1)]


def test_list_uidl_top_dele_rset(pop: Instance) -> None:
    user = new_user(pop)
    raws = {f"m{i}": deliver(pop, user, f"m{i}", b"body line %d\r\nsecond\r\nthird\r\n" % i) for i in range(3)}
    p = pop3s(pop, user)
    uidls = imap_uidl(pop, user)  # the index exists once the mailbox was opened
    try:
        order = order_of(p)
        assert sorted(order) == sorted(raws)
        assert p.list()[1] == [b"%d %d" % (n, len(raws[s])) for n, s in enumerate(order, 1)]
        assert p.uidl()[1] == [f"{n} {uidls[s]}".encode() for n, s in enumerate(order, 1)]
        assert p.uidl(2) == f"+OK 2 {uidls[order[1]]}".encode()
        assert p.list(3) == b"+OK 3 %d" % len(raws[order[2]])
        _, top, _ = p.top(1, 1)
        head = raws[order[0]].split(b"\r\n\r\n", 1)[0]
        assert retr_text(top) == head + b"\r\n\r\nbody line %s\r\n" % order[0][1:].encode()
        assert p.dele(2) == b"+OK Message 2 deleted"
        with pytest.raises(poplib.error_proto, match="already deleted"):
            p.dele(2)
        for command in (lambda: p.retr(2), lambda: p.list(2), lambda: p.retr(9), lambda: p.top(0, 1)):
            with pytest.raises(poplib.error_proto, match="No such message"):
                command()
        assert p.stat() == (2, len(raws[order[0]]) + len(raws[order[2]]))
        assert p.rset().startswith(b"+OK Maildrop has 3 messages")
        assert p.dele(3).startswith(b"+OK")
        assert p.quit() == b"+OK Logging out"
    finally:
        p.close()
    assert sorted(subject_of(f.read_bytes()) for f in maildir_files(pop, user)) == sorted(order[:2])


def test_retr_bytes_exact_with_dot_stuffing_and_large_message(pop: Instance) -> None:
    user, big_user = new_user(pop), new_user(pop)
    small = deliver(pop, user, "dots", b".\r\n..\r\n.x\r\nend.\r\n")
    lines = [b"%06d %s" % (i, b"." * (i % 3) + b"x" * 70) for i in range(60000)]  # about 4.5 MB
    big = deliver(pop, big_user, "big", b"\r\n".join(lines) + b"\r\n")
    r = Raw(pop, "pop3s")
    try:
        r.line()
        r.cmd(b"USER " + user.encode())
        assert r.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
        # RFC 1939 §3: each line starting with "." gets one more; the body ends with CRLF.CRLF
        assert r.cmd(b"RETR 1") == b"+OK %d octets" % len(small)
        assert r.multiline() == small.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        assert r.cmd(b"QUIT") == b"+OK Logging out"
    finally:
        r.close()
    r = Raw(pop, "pop3s")
    try:
        r.line()
        r.cmd(b"USER " + big_user.encode())
        assert r.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
        assert r.cmd(b"RETR 1") == b"+OK %d octets" % len(big)
        assert r.multiline() == big.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        assert r.cmd(b"TOP 1 2") == b"+OK Top of message follows"
        head = big.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        assert r.multiline() == head + b"\r\n".join(lines[:2]) + b"\r\n.\r\n"
        assert r.cmd(b"QUIT") == b"+OK Logging out"
    finally:
        r.close()


def test_pipelined_commands(pop: Instance) -> None:
    user = new_user(pop)
    raw = deliver(pop, user, "pipelined")
    r = Raw(pop, "pop3s")
    try:
        r.line()
        r.send(b"USER %s\r\nPASS %s\r\nSTAT\r\nUIDL 1\r\nRETR 1\r\nNOOP\r\nQUIT\r\n" % (
            user.encode(), PASSWORD.encode()))
        assert r.line() == b"+OK Send PASS"
        assert r.line().startswith(b"+OK Maildrop has 1")
        assert r.line() == b"+OK 1 %d" % len(raw)
        assert r.line().startswith(b"+OK 1 ")
        assert r.line() == b"+OK %d octets" % len(raw)
        assert r.multiline() == raw + b".\r\n"
        assert r.line() == b"+OK"
        assert r.line() == b"+OK Logging out"
    finally:
        r.close()


def test_bad_commands(pop: Instance) -> None:
    r = Raw(pop, "pop3s")
    try:
        r.line()
        assert r.cmd(b"XYZZY") == b"-ERR Unknown command"
        assert r.cmd(b"USER " + b"a" * 300) == b"-ERR Line too long"  # RFC 2449 §4: 255 octets
        assert r.cmd(b"NOOP") == b"-ERR Command not valid in this state"
        assert r.cmd(b"QUIT") == b"+OK Logging out"
    finally:
        r.close()


def test_in_use_in_process_and_across_processes(pop: Instance) -> None:
    user = new_user(pop)
    deliver(pop, user, "locked")
    first = pop3s(pop, user)
    try:
        second = pop3s(pop)
        try:
            second.user(user)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
                second.pass_(PASSWORD)
        finally:
            second.close()
        first.quit()
    finally:
        first.close()
    # Another process (this test) holding the lock file: the same answer.
    home = pop.maildir(user).parent
    fd = os.open(home / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = pop3s(pop)
        try:
            p.user(user)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
                p.pass_(PASSWORD)
        finally:
            p.close()
    finally:
        os.close(fd)
    login_retrying(pop, user).quit()


def test_dropped_connection_deletes_nothing(pop: Instance) -> None:
    user = new_user(pop)
    for i in range(2):
        deliver(pop, user, f"keep{i}")
    p = pop3s(pop, user)
    assert p.dele(1).startswith(b"+OK") and p.dele(2).startswith(b"+OK")
    p.sock.shutdown(socket.SHUT_RDWR)  # RFC 1939 §6: no QUIT, no UPDATE
    p.close()
    p = login_retrying(pop, user)
    try:
        assert p.stat()[0] == 2
        p.quit()
    finally:
        p.close()
    assert len(maildir_files(pop, user)) == 2


def test_delivery_during_session_waits_for_next_session(pop: Instance) -> None:
    user = new_user(pop)
    first = deliver(pop, user, "before")
    p = pop3s(pop, user)
    try:
        assert p.stat() == (1, len(first))
        deliver(pop, user, "during")
        assert p.stat() == (1, len(first))
        assert p.list()[1] == [b"1 %d" % len(first)]
        assert len(p.uidl()[1]) == 1
        assert p.dele(1).startswith(b"+OK")
        p.quit()
    finally:
        p.close()
    p = login_retrying(pop, user)
    try:
        assert p.stat()[0] == 1
        _, lines, _ = p.retr(1)
        assert retr_text(lines) == stored(pop, user, "during")
        p.quit()
    finally:
        p.close()


def test_retr_sets_seen_for_imap_top_does_not(pop: Instance) -> None:
    user = new_user(pop)
    for name in ("read", "peeked"):
        deliver(pop, user, name)
    p = pop3s(pop, user)
    uidls = imap_uidl(pop, user)
    try:
        order = order_of(p)
        p.retr(order.index("read") + 1)
        p.top(order.index("peeked") + 1, 0)
        p.quit()
    finally:
        p.close()
    names = {subject_of(f.read_bytes()): f.name for f in maildir_files(pop, user)}
    assert names["read"].endswith(":2,S")  # maildir(5) info: Seen
    assert ":2," not in names["peeked"]
    # IMAP sees the same: \Seen on the RETRieved message, and UID/UIDVALIDITY behind each UIDL.
    m = imaplib.IMAP4_SSL(*pop.addr("imaps"), ssl_context=pop.client_ssl_context(), timeout=20)
    try:
        m.login(user, PASSWORD)
        m.select("INBOX", readonly=True)
        uidvalidity = int(m.response("UIDVALIDITY")[1][0])
        _, data = m.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        seen = {}
        for item in data:
            if isinstance(item, tuple):
                uid = int(item[0].split(b"UID ")[1].split()[0])
                subject = subject_of(item[1])
                seen[subject] = b"\\Seen" in item[0]
                assert uidls[subject] == f"{uid:08X}{uidvalidity:08X}"
        assert seen == {"read": True, "peeked": False}
    finally:
        m.logout()


def test_uidl_stable_across_sessions_and_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    inst = Instance(tmp_path_factory.mktemp("restart"), "a.test")
    inst.start()
    try:
        user = new_user(inst)
        for i in range(3):
            deliver(inst, user, f"s{i}")

        def uidls() -> list[bytes]:
            p = login_retrying(inst, user)
            try:
                return p.uidl()[1]
            finally:
                p.quit()
                p.close()

        before = uidls()
        assert len(before) == 3 and uidls() == before
        inst.stop()
        inst.start()
        assert uidls() == before
        # A message deleted over POP3 leaves the others' UIDLs alone.
        p = login_retrying(inst, user)
        p.dele(1)
        p.quit()
        p.close()
        after = uidls()
        assert [u.split()[1] for u in after] == [u.split()[1] for u in before[1:]]
        # And deleting the index (a rebuild from the Maildir) keeps them too.
        inst.stop()
        for f in inst.maildir(user).parent.glob("postier-index.sqlite*"):
            f.unlink()
        inst.start()
        assert [u.split()[1] for u in uidls()] == [u.split()[1] for u in before[1:]]
    finally:
        inst.stop()


# -- limits, throttling, LOGIN-DELAY, shutdown --------------------------------------------------------

@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    inst = Instance(tmp_path_factory.mktemp("strict"), "a.test", extra_config=(
        "[auth]\nfailure_delay = 0.05\nmax_failures = 3\n"
        "[pop3]\nlogin_delay = 1\nexpire = \"30\"\n"
        "[limits]\nmax_connections_per_ip = 4\nmax_errors = 5\n"))
    inst.start()
    yield inst
    inst.stop()


def test_login_delay(strict: Instance) -> None:
    user = new_user(strict)
    p = pop3s(strict)
    capa = p.capa()
    assert capa["LOGIN-DELAY"] == ["1"] and capa["EXPIRE"] == ["30"]
    p.user(user)
    p.pass_(PASSWORD)
    p.quit()
    p.close()
    p = pop3s(strict)
    p.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\]"):
        p.pass_(PASSWORD)
    p.close()
    time.sleep(1.1)
    p = pop3s(strict, user)
    p.quit()
    p.close()


def test_failed_logins_are_throttled(strict: Instance) -> None:
    user = new_user(strict)
    r = Raw(strict, "pop3s", source="127.0.0.9")
    try:
        r.line()
        for _ in range(2):
            r.cmd(b"USER " + user.encode())
            assert r.cmd(b"PASS bad").startswith(b"-ERR [AUTH]")
        r.cmd(b"USER " + user.encode())
        assert r.cmd(b"PASS bad").startswith(b"-ERR [AUTH]")
        with pytest.raises((EOFError, ConnectionError)):  # the third failure blocks the IP: dropped
            r.cmd(b"NOOP")
    finally:
        r.close()
    r = Raw(strict, "pop3s", source="127.0.0.9")
    try:  # even the right password is refused while blocked
        r.line()
        r.cmd(b"USER " + user.encode())
        assert r.cmd(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [SYS/TEMP]")
    finally:
        r.close()
    # Other addresses are not affected.
    p = pop3s(strict, user)
    p.quit()
    p.close()


def test_failed_scram_is_throttled(strict: Instance) -> None:
    user = new_user(strict)
    r = Raw(strict, "pop3s", source="127.0.0.10")
    try:
        r.line()
        for _ in range(3):
            client = ScramClient(user, "not the password")
            challenge = r.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.first_message()).encode())
            assert challenge.startswith(b"+ ")
            final = client.final_message(base64.b64decode(challenge[2:]))
            assert r.cmd(b64(final).encode()) == b"-ERR [AUTH] Authentication failed."
        with pytest.raises((EOFError, ConnectionError)):  # blocked after the third failure
            r.cmd(b"NOOP")
    finally:
        r.close()


def test_too_many_errors_and_busy(strict: Instance) -> None:
    r = Raw(strict, "pop3s")
    try:
        r.line()
        for n in range(4):
            assert r.cmd(b"BAD%d" % n) == b"-ERR Unknown command"
        assert r.cmd(b"BAD") == b"-ERR Too many errors, closing connection."
        with pytest.raises((EOFError, ConnectionError)):
            r.line()
    finally:
        r.close()
    held = [Raw(strict, "pop3", source="127.0.0.8") for _ in range(4)]
    try:
        for h in held:
            h.line()
        extra = Raw(strict, "pop3", source="127.0.0.8")
        try:
            assert extra.line() == b"-ERR [SYS/TEMP] Too many connections, try again later."
        finally:
            extra.close()
    finally:
        for h in held:
            h.close()


def test_shutdown_ends_sessions_without_deleting(strict: Instance) -> None:
    user = new_user(strict)
    deliver(strict, user, "survivor")
    time.sleep(1.1)  # LOGIN-DELAY of this instance
    r = Raw(strict, "pop3s")
    try:
        r.line()
        r.cmd(b"USER " + user.encode())
        assert r.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
        assert r.cmd(b"DELE 1").startswith(b"+OK")
        started = time.monotonic()
        assert strict.stop() == 0
        assert time.monotonic() - started < 5
        assert r.line() == b"-ERR [SYS/TEMP] Server shutting down."
    finally:
        r.close()
        strict.start()
    assert len(maildir_files(strict, user)) == 1
