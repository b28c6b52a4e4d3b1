"""Cluster mode end to end: postier nodes on 127.0.0.2-4 sharing one PostgreSQL and one S3 bucket.
Mail taken in by any node is read over IMAP on the others with the same UIDs; IDLE on B wakes for an
APPEND on A; with PostgreSQL or the object store stopped, SMTP answers 4xx and IMAP NO [UNAVAILABLE],
never an OK."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from tests.harness import Instance, start_all  # noqa: E402
from tests.programs import mbsync, mbsync_config  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402

DOMAIN = "example.org"
ALICE = f"alice@{DOMAIN}"
PASSWORD = "password123"


def _can_bind(addr: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def make_nodes(root: Path, dsn: str, s3: S3Server, count: int = 2, cluster: str = "",  # noqa: PLR0913
               extra: str = "", status: bool = False) -> list[Instance]:
    """`count` cluster nodes on 127.0.0.2.. sharing one database and bucket (`cluster`: more keys of
    `[cluster]`, `extra`: more tables), the tables made and the domain and alice added once; not started.
    `status`: `postier cluster status` is checked before (it fails) and after `cluster init` (on
    each node); one test asks, the others skip these commands."""
    if not _can_bind(f"127.0.0.{count + 1}"):
        pytest.skip(f"no 127.0.0.2-{count + 1} loopback addresses")
    bucket = s3.bucket()
    nodes = []
    for i in range(count):
        d = root / f"node{i}"
        d.mkdir()
        (d / "s3.secret").write_text("test\n")
        inst = Instance(d, DOMAIN, address=f"127.0.0.{i + 2}", extra_config=(
            f'[cluster]\ndsn = "{dsn}"\ns3_endpoint = "{s3.endpoint}"\ns3_bucket = "{bucket}"\n'
            f's3_access_key = "test"\ns3_secret_key_file = "s3.secret"\ntimeout = 2.0\n{cluster}'))
        if extra:
            inst.add_config(extra)
        nodes.append(inst)
    if status:
        assert nodes[0].cli("cluster", "status", check=False).returncode == 1  # no bucket, no tables yet
    nodes[0].cli("cluster", "init")
    nodes[0].cli("domain", "add", DOMAIN)  # accounts are in PostgreSQL: added once, for every node
    nodes[0].add_user(ALICE, PASSWORD)
    if status:
        for inst in nodes:
            assert "postgresql: ok" in inst.cli("cluster", "status").stdout
    return nodes


def _nodes(root: Path, dsn: str, s3: S3Server, count: int = 2, status: bool = False) -> list[Instance]:
    nodes = make_nodes(root, dsn, s3, count, status=status)
    start_all(nodes)
    return nodes


def imap(inst: Instance) -> imaplib.IMAP4:
    c = imaplib.IMAP4(*inst.addr("imap"), timeout=20)
    c.starttls(inst.client_ssl_context())
    c.login(ALICE, PASSWORD)
    return c


def send(inst: Instance, subject: str) -> None:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        s.sendmail("bob@example.net", [ALICE], f"From: bob@example.net\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
                   f"\r\nHello from {subject}\r\n")


def fetch_all(c: imaplib.IMAP4) -> dict[int, bytes]:
    typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    assert typ == "OK", data
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(item[0].split(b"UID ")[1].split()[0])
            out[uid] = item[1]
    return out


def test_mail_to_node_a_is_read_on_node_b_with_the_same_uids(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    a, b, c3 = _nodes(tmp_path, pg.create_db(), s3, count=3, status=True)  # 127.0.0.2-4
    try:
        _same_uids_everywhere(a, b, c3)
    finally:
        for n in (a, b, c3):
            n.stop()


def _same_uids_everywhere(a: Instance, b: Instance, c3: Instance) -> None:
    send(a, "one")
    send(b, "two")
    send(c3, "three")
    seen = []
    for inst in (b, c3, a):
        c = imap(inst)
        try:
            typ, data = c.select("INBOX")
            assert typ == "OK" and data == [b"3"]
            msgs = fetch_all(c)
            seen.append({u: m.split(b"Subject: ")[1].split(b"\r\n")[0] for u, m in msgs.items()})
            assert c.response("UIDVALIDITY")[1] != [None]
        finally:
            c.logout()
    assert seen[0] == seen[1] == seen[2] == {1: b"one", 2: b"two", 3: b"three"}


def test_idle_on_b_wakes_for_append_on_a(nodes: list[Instance]) -> None:
    a, b = nodes
    watcher = imap(b)
    writer = imap(a)
    try:
        assert watcher.select("INBOX")[1] == [b"0"]
        tag = watcher._new_tag().decode()
        watcher.send(f"{tag} IDLE\r\n".encode())
        assert watcher.readline().startswith(b"+")
        typ, data = writer.append("INBOX", None, None, b"From: x@example.org\r\nSubject: idle\r\n\r\nx\r\n")
        assert typ == "OK" and b"APPENDUID" in data[0], data
        line = watcher.readline()
        assert line == b"* 1 EXISTS\r\n", line
        watcher.send(b"DONE\r\n")
        while not (line := watcher.readline()).startswith(tag.encode()):
            pass
        assert b" OK " in line
    finally:
        writer.logout()
        watcher.logout()


def test_postgresql_down_means_4xx_and_unavailable_never_ok(tmp_path: Path, pg_own: PgServer, s3: S3Server) -> None:
    a, b = _nodes(tmp_path, pg_own.create_db(), s3)
    try:
        send(a, "before")
        c = imap(b)
        try:
            assert c.select("INBOX")[1] == [b"1"]
            pg_own.stop()
            st = a.cli("cluster", "status", check=False)
            assert st.returncode == 1 and "postgresql: UNREACHABLE" in st.stdout, st.stdout
            typ, data = c.append("INBOX", None, None, b"Subject: lost?\r\n\r\nx\r\n")
            assert typ == "NO" and b"[UNAVAILABLE]" in data[0], (typ, data)
            typ, data = c.select("INBOX")
            assert typ == "NO" and b"[UNAVAILABLE]" in data[0], (typ, data)
        finally:
            c.logout()
        with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
            s.ehlo()
            s.mail("bob@example.net")
            code, _ = s.rcpt(ALICE)
            assert 400 <= code < 500, code  # the accounts are in PostgreSQL too: no lookup, no 250
        pg_own.start()
        for _ in range(60):  # the node's pool reconnects with a back-off: until then NO [UNAVAILABLE]
            try:
                c = imap(b)
                break
            except imaplib.IMAP4.error as exc:
                assert "UNAVAILABLE" in str(exc), exc
                time.sleep(0.5)
        else:
            raise AssertionError("no login on B after PostgreSQL came back")
        try:
            for _ in range(3):  # the node's pool drops its broken connections and reconnects
                typ, data = c.select("INBOX")
                if typ == "OK":
                    break
            assert data == [b"1"]  # nothing was stored while PostgreSQL was down
        finally:
            c.logout()
    finally:
        a.stop()
        b.stop()


def test_imap_and_pop3_commands_across_nodes(nodes: list[Instance]) -> None:
    """The IMAP commands that touch the store, on A, seen from B; then POP3 on B."""
    a, b = nodes
    for n in range(4):
        send(a, f"m{n}")
    c = imap(a)
    d = imap(b)
    try:
        assert c._simple_command("ENABLE", "CONDSTORE QRESYNC")[0] == "OK"
        typ, _ = c.select("INBOX")
        assert typ == "OK"
        assert c.uid("STORE", "1,2", "+FLAGS", r"(\Flagged $Work)")[0] == "OK"
        typ, data = c.uid("FETCH", "1:*", "(FLAGS MODSEQ)")
        assert typ == "OK" and len(data) == 4 and b"$Work" in data[0] and b"MODSEQ" in data[0]
        typ, data = c.uid("SEARCH", "FLAGGED")
        assert data == [b"1 2"]
        typ, data = c.uid("SEARCH", "SUBJECT", "m3")
        assert data == [b"4"]
        assert c.create("Work")[0] == "OK"
        typ, data = c.uid("COPY", "1", "Work")
        assert typ == "OK"
        typ, data = c.uid("MOVE", "2", "Work")
        assert typ == "OK"
        assert c.uid("STORE", "3", "+FLAGS", r"(\Deleted)")[0] == "OK"
        assert c.expunge()[0] == "OK"
        typ, data = c.status("Work", "(MESSAGES UIDNEXT UNSEEN HIGHESTMODSEQ)")
        assert typ == "OK" and b"MESSAGES 2" in data[0] and b"UIDNEXT 3" in data[0]
        typ, data = c.uid("FETCH", "4", "(BODYSTRUCTURE ENVELOPE RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER])")
        assert typ == "OK" and b"ENVELOPE" in data[0][0]
        assert c.rename("Work", "Projects")[0] == "OK"
        # node B sees all of it
        typ, data = d.select("INBOX")
        assert typ == "OK" and data == [b"2"]  # 1 and 4: 2 moved, 3 expunged
        typ, data = d.list()
        assert typ == "OK" and any(b"Projects" in x for x in data) and not any(b'"Work"' in x for x in data)
        typ, data = d.select("Projects")
        assert typ == "OK" and data == [b"2"]
        typ, data = d.uid("FETCH", "1:*", "(FLAGS)")
        assert all(b"$Work" in x for x in data)
    finally:
        c.logout()
        d.logout()
    p = poplib.POP3(*b.addr("pop3"), timeout=20)
    try:
        p.stls(b.client_ssl_context())
        p.user(ALICE)
        p.pass_(PASSWORD)
        count, _size = p.stat()
        assert count == 2
        assert b"Subject: m3" in p.retr(2)[1]
        p.dele(1)
    finally:
        p.quit()
    c = imap(a)
    try:
        assert c.select("INBOX")[1] == [b"1"]  # POP3's DELE on B, applied at QUIT
    finally:
        c.logout()


def pop3(inst: Instance) -> poplib.POP3:
    p = poplib.POP3(*inst.addr("pop3"), timeout=20)
    p.stls(inst.client_ssl_context())
    p.user(ALICE)
    return p


def test_pop3_maildrop_lock_across_nodes(nodes: list[Instance]) -> None:
    """RFC 1939 §8 / RFC 2449 §8.1: while a POP3 session on A holds the maildrop, a session on B (and a
    second one on A) gets -ERR [IN-USE]; after A's QUIT, B gets in."""
    a, b = nodes
    send(a, "one")
    first = pop3(a)
    try:
        first.pass_(PASSWORD)
        for inst in (b, a):
            second = pop3(inst)
            try:
                with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
                    second.pass_(PASSWORD)
            finally:
                second.close()
        assert first.stat()[0] == 1
        first.dele(1)
    finally:
        first.quit()
    second = pop3(b)
    try:
        second.pass_(PASSWORD)
        assert second.stat()[0] == 0  # A's DELE was applied at its QUIT, before the lock was let go
    finally:
        second.quit()


def test_sieve_script_from_node_a_runs_at_delivery_on_node_b(tmp_path: Path, nodes: list[Instance]) -> None:
    """A script uploaded over ManageSieve (sieve-connect) on A files mail taken in by B into a new
    folder with its imap4flags, keywords included (RFC 5232); `postier sieve` on B lists it."""
    import os
    import subprocess

    from tests.programs import require
    a, b = nodes
    script = tmp_path / "work.sieve"
    script.write_text('require ["fileinto", "imap4flags"];\n'
                      'if header :contains "subject" "boss" { addflag ["\\\\Flagged", "$Boss"]; fileinto "Work"; }\n')

    def sc(*args: str) -> subprocess.CompletedProcess[str]:
        r, w = os.pipe()
        os.write(w, PASSWORD.encode() + b"\n")
        os.close(w)
        host, port = a.addr("managesieve")
        try:
            return subprocess.run(
                [require("sieve-connect"), "--server", host, "--port", str(port), "--user", ALICE,
                 "--passwordfd", str(r), "--tlscafile", str(a.root / "tls" / "cert.pem"),
                 "--tlshostname", a.hostname, "--authmech", "PLAIN", *args],
                capture_output=True, text=True, timeout=60, pass_fds=(r,))
        finally:
            os.close(r)

    up = sc("--upload", "--localsieve", str(script), "--remotesieve", "work")
    assert up.returncode == 0, up.stdout + up.stderr
    act = sc("--activate", "--remotesieve", "work")
    assert act.returncode == 0, act.stdout + act.stderr
    assert "work  (active)" in b.cli("sieve", "list", ALICE).stdout
    send(b, "from the boss")
    send(b, "plain")
    c = imap(a)
    try:
        assert c.select("INBOX")[1] == [b"1"]
        assert c.select("Work")[1] == [b"1"]
        typ, data = c.uid("FETCH", "1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"\\Flagged" in data[0][0] and b"$Boss" in data[0][0], data
        assert b"from the boss" in data[0][1]
    finally:
        c.logout()


def test_quota_at_smtp_and_imap_across_nodes(nodes: list[Instance]) -> None:
    """The single-machine quota checks on cluster nodes (pipeline/quota.py, RFC 9208): usage is the
    user's rows in PostgreSQL, whichever node stored them. RCPT with a SIZE= that cannot fit and DATA
    that does not fit get 452 4.2.2 on B after A filled the mailbox; IMAP APPEND gets NO [OVERQUOTA]."""
    a, b = nodes
    carol = f"quota-carol@{DOMAIN}"
    a.cli("user", "add", carol, "--password-stdin", "--quota", "2K", stdin=PASSWORD + "\n")  # every node sees it
    big = "x" * 1400
    with smtplib.SMTP(*a.addr("smtp"), timeout=20) as s:
        s.sendmail("bob@example.net", [carol], f"Subject: fits\r\n\r\n{big}\r\n")
    with smtplib.SMTP(*b.addr("smtp"), timeout=20) as s:
        s.ehlo()
        assert s.mail("bob@example.net", ["SIZE=1000"])[0] == 250
        code, text = s.rcpt(carol)
        assert (code, text[:5]) == (452, b"4.2.2"), (code, text)
        s.rset()
        s.mail("bob@example.net")
        assert s.rcpt(carol)[0] == 250  # no SIZE=: room is left, the message decides
        code, text = s.data(f"Subject: too big\r\n\r\n{big}\r\n".encode())
        assert (code, text[:5]) == (452, b"4.2.2"), (code, text)
    c = imaplib.IMAP4(*a.addr("imap"), timeout=20)
    c.starttls(a.client_ssl_context())
    c.login(carol, PASSWORD)
    try:
        typ, data = c.append("INBOX", None, None, f"Subject: append\r\n\r\n{big}\r\n".encode())
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
        assert c.select("INBOX")[1] == [b"1"]
        typ, data = c.getquotaroot("INBOX")
        assert typ == "OK" and b"STORAGE 1 2" in data[1][0], data
    finally:
        c.logout()
    # the 80 % warning, its state in PostgreSQL: mail through B and C... until 17 of 20 KiB are used
    erin = f"erin@{DOMAIN}"
    a.cli("user", "add", erin, "--password-stdin", "--quota", "20K", stdin=PASSWORD + "\n")
    c = imaplib.IMAP4(*a.addr("imap"), timeout=20)
    c.starttls(a.client_ssl_context())
    c.login(erin, PASSWORD)
    try:
        for n in range(20):
            with smtplib.SMTP(*nodes[n % 2].addr("smtp"), timeout=20) as s:
                s.sendmail("bob@example.net", [erin], f"Subject: m{n}\r\n\r\n{'y' * 900}\r\n")
            typ, data = c.getquotaroot("INBOX")
            if int(data[1][0].split(b"STORAGE ")[1].split()[0]) >= 17:
                break
        for _ in range(100):  # the warning follows the delivery (a task): bounded wait
            c.select("INBOX")
            typ, data = c.uid("SEARCH", "SUBJECT", "\"80% full\"")
            if data[0]:
                break
            time.sleep(0.2)
        assert len(data[0].split()) == 1, data
    finally:
        c.logout()


def _maildir_contents(root: Path) -> dict[str, list[tuple[bytes, str]]]:
    """folder -> sorted (message bytes, flag letters) of a Maildir++ tree."""
    out: dict[str, list[tuple[bytes, str]]] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("."))]:
        name = "INBOX" if folder == root else folder.name[1:]
        items = []
        for sub in ("new", "cur"):
            if (folder / sub).is_dir():
                for f in (folder / sub).iterdir():
                    items.append((f.read_bytes(), f.name.partition(":2,")[2]))
        out[name] = sorted(items)
    return out


def test_export_import_moves_a_user_between_modes(tmp_path: Path, nodes: list[Instance]) -> None:
    """cluster -> Maildir -> single-machine -> Maildir -> cluster (another user): same messages, folders
    and flags all the way."""
    a, b = nodes
    send(a, "one")
    send(a, "two")
    c = imap(a)
    try:
        c.select("INBOX")
        assert c.uid("STORE", "1", "+FLAGS", r"(\Seen \Flagged)")[0] == "OK"
        assert c.create("Work")[0] == "OK"
        assert c.uid("COPY", "2", "Work")[0] == "OK"
    finally:
        c.logout()
    out1, out2 = tmp_path / "from-cluster", tmp_path / "from-single"
    a.cli("export", ALICE, "--maildir", str(out1))
    (tmp_path / "single").mkdir()
    single = Instance(tmp_path / "single", DOMAIN)
    single.add_user(ALICE, PASSWORD)
    single.cli("import", "maildir", str(out1), "--into", ALICE)
    single.cli("export", ALICE, "--maildir", str(out2))
    first, second = _maildir_contents(out1), _maildir_contents(out2)
    assert first == second
    assert len(first["INBOX"]) == 2 and len(first["Work"]) == 1 and "FS" in {f for _m, f in first["INBOX"]}
    bob = f"bob@{DOMAIN}"
    a.add_user(bob, PASSWORD)
    a.cli("import", "maildir", str(out2), "--into", bob)
    d = imaplib.IMAP4(*b.addr("imap"), timeout=20)
    d.starttls(b.client_ssl_context())
    d.login(bob, PASSWORD)
    try:
        assert d.select("INBOX")[1] == [b"2"]
        typ, data = d.uid("FETCH", "1:*", "(FLAGS)")
        assert any(b"\\Flagged" in x and b"\\Seen" in x for x in data), data
        assert d.select("Work")[1] == [b"1"]
    finally:
        d.logout()
    # cluster -> Maildir -> cluster keeps UIDVALIDITY and UIDs (from the export's dovecot-uidlist)
    carol = f"carol@{DOMAIN}"
    a.add_user(carol, PASSWORD)  # accounts are in PostgreSQL: every node sees her
    a.cli("import", "maildir", str(out1), "--into", carol)
    seen = []
    for who in (ALICE, carol):
        d = imaplib.IMAP4(*b.addr("imap"), timeout=20)
        d.starttls(b.client_ssl_context())
        d.login(who, PASSWORD)
        try:
            d.select("Work")
            seen.append((d.response("UIDVALIDITY")[1], fetch_all(d)))
        finally:
            d.logout()
    assert seen[0] == seen[1] and list(seen[0][1]) == [1]
    gc = a.cli("cluster", "gc").stdout.splitlines()  # all in use, all recent: nothing deleted by either pass
    assert gc[0] == "deleted 0 unreferenced bodies" and gc[1].endswith(
        "0 without a row but referenced (row added), 0 without a row or a reference (deleted)")


def test_object_store_down_means_4xx_and_unavailable_never_ok(tmp_path: Path, pg: PgServer) -> None:
    own = S3Server()
    dsn = pg.create_db()
    a, b = _nodes(tmp_path, dsn, own)
    try:
        send(a, "before")
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:  # as a body stored before header blocks were kept
            conn.execute("DELETE FROM body_heads")
        c = imap(b)
        try:
            assert c.select("INBOX")[1] == [b"1"]
            own.stop()
            typ, data = c.append("INBOX", None, None, b"Subject: lost?\r\n\r\nx\r\n")
            assert typ == "NO" and b"[UNAVAILABLE]" in data[0], (typ, data)
            assert c.select("INBOX")[1] == [b"1"]  # the index is there; nothing was added
            # the body is only on the stopped object store (B never read it): not "expunged meanwhile"
            for what in ("(BODY.PEEK[])", "(BODY.PEEK[HEADER] BODYSTRUCTURE)"):
                typ, data = c.fetch("1", what)
                assert typ == "NO" and b"[UNAVAILABLE]" in data[0], (what, typ, data)
            typ, data = c.sort("(SUBJECT)", "UTF-8", "ALL")  # the header is out of reach too
            assert typ == "NO" and b"[UNAVAILABLE]" in data[0], (typ, data)
        finally:
            c.logout()
        with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
            s.ehlo()
            s.mail("bob@example.net")
            assert s.rcpt(ALICE)[0] == 250
            code, text = s.data(b"Subject: lost?\r\n\r\nx\r\n")
            assert 400 <= code < 500, (code, text)
        st = a.cli("cluster", "status", check=False)
        assert st.returncode == 1 and "object store: UNREACHABLE" in st.stdout, st.stdout
    finally:
        a.stop()
        b.stop()


def test_mbsync_against_node_a_then_node_b_sees_no_change(nodes: list[Instance], tmp_path: Path) -> None:
    """A client that synchronised with node A and is then pointed at node B (a DNS name that moved, a
    load balancer) finds the same UIDVALIDITY, UIDs and flags there: mbsync copies nothing and
    changes nothing, in either direction."""
    a, b = nodes
    for n in range(3):
        send(a if n % 2 else b, f"sync {n}")
    c = imap(a)
    try:
        c.create("Work")
        c.select("INBOX")
        c.uid("COPY", "1", "Work")
        c.uid("STORE", "2", "+FLAGS", r"(\Seen \Flagged)")
    finally:
        c.logout()
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"

    def sync(inst: Instance) -> str:
        mbsync_config(rc, local, inst.port("imap"), ALICE, PASSWORD, inst.root / "tls" / "cert.pem",
                      ssl_type="STARTTLS", host=inst.address)
        return mbsync(rc, verbose=True)

    def files() -> set[str]:
        return {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and "mbsync" not in p.name}

    def server_state() -> dict[str, list[bytes]]:
        c = imap(a)
        try:
            out = {}
            for box in ("INBOX", "Work"):
                c.select(box, readonly=True)
                typ, data = c.uid("FETCH", "1:*", "(UID FLAGS)")
                assert typ == "OK"
                out[box] = sorted(d for d in data if isinstance(d, bytes))
            return out
        finally:
            c.logout()

    sync(a)
    before = server_state()
    got = files()
    assert sum(1 for f in got if "/cur/" in f or "/new/" in f) == 4, got  # three in INBOX, one in Work
    assert any(f.endswith("FS") for f in got), got  # the \Flagged \Seen message
    out = sync(b)
    assert files() == got, out  # nothing copied, renamed (flags) or removed on the client
    assert "far side: 3 messages" in out and "far side: 1 messages" in out, out  # the same folders
    assert server_state() == before, out  # nor on the server
