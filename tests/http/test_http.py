"""The http/https listeners of a real `postier serve`: routing, Host checks, redirects and bad input.

Clients: httpx over real TLS (the instance's self-signed certificate), and raw sockets where a request
must be malformed, trickled or oversized on purpose.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Instance

DOMAIN = "example.test"
HOST = f"mail.{DOMAIN}"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("http"), DOMAIN,
                 extra_config="[limits]\ncommand_timeout = 1.5\nmax_connections_per_ip = 8\n")
    i.start()
    yield i
    i.stop()


def https(inst: Instance) -> httpx.Client:
    return inst.web(timeout=10)


def http(inst: Instance) -> httpx.Client:
    return inst.web(tls=False, timeout=10)


def raw(inst: Instance, data: bytes, tls: bool = False, read: bool = True) -> bytes:
    """Send `data` on a fresh connection and read the whole answer (until the server closes)."""
    sock = socket.create_connection(("127.0.0.1", inst.port("https" if tls else "http")), timeout=10)
    if tls:
        sock = inst.client_ssl_context().wrap_socket(sock)
    with sock:
        sock.sendall(data)
        out = b""
        while read:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            out += chunk
        return out


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_https_serves_our_hosts_over_tls(inst: Instance) -> None:
    with https(inst) as c:
        r = c.get("/.well-known/acme-challenge/" + "A" * 43, headers={"Host": HOST})
        assert r.status_code == 404  # no pending challenge
        assert c.get("/nothing-here", headers={"Host": f"autoconfig.{DOMAIN}"}).status_code == 404
        ext = c.get("/", headers={"Host": HOST}).extensions["network_stream"].get_extra_info("ssl_object")
        assert ext.version() in ("TLSv1.2", "TLSv1.3")


def test_many_clients_at_once(inst: Instance) -> None:
    """Sixteen TLS clients in parallel, each with a few keep-alive requests: every one answered."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> list[int]:
        with https(inst) as c:
            return [c.get(f"/.well-known/mta-sts.txt?n={i}", headers={"Host": f"mta-sts.{DOMAIN}"}).status_code
                    for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:  # under the per-IP cap of this instance (8)
        results = list(pool.map(one, range(16)))
    assert results == [[200, 200, 200]] * 16
    with https(inst) as c:
        r = c.get("/.well-known/mta-sts.txt", headers={"Host": f"mta-sts.{DOMAIN}"})
        assert r.headers["server"] == "postier" and r.headers["x-content-type-options"] == "nosniff"


def test_http_redirects_to_https_except_challenges(inst: Instance) -> None:
    with http(inst) as c:
        r = c.get("/some/page?x=1", headers={"Host": DOMAIN})
        assert r.status_code == 308
        assert r.headers["location"] == f"https://{DOMAIN}:{inst.port('https')}/some/page?x=1"
        r = c.post("/autodiscover/autodiscover.xml", headers={"Host": f"autodiscover.{DOMAIN}"}, content=b"x")
        assert r.status_code == 308  # the method is kept (RFC 9110 §15.4.9)
        r = c.get("/.well-known/acme-challenge/" + "B" * 43, headers={"Host": HOST})
        assert r.status_code == 404  # answered here, not redirected


def test_unknown_or_missing_host_is_refused(inst: Instance) -> None:
    with https(inst) as c:
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 421
        assert c.get("/", headers={"Host": "[::1]:443"}).status_code == 421
    with http(inst) as c:
        assert c.get("/", headers={"Host": "127.0.0.1"}).status_code == 421
    assert status(raw(inst, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")) == 400
    two = b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    assert status(raw(inst, two)) == 400


@pytest.mark.parametrize("path", [
    b"/.well-known/acme-challenge/../../../../etc/passwd",
    b"/.well-known/acme-challenge/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"/.well-known/acme-challenge/..%2f..%2f..%2fetc%2fpasswd",
    b"/..%2f..%2f..%2fetc/passwd",
    b"//etc/passwd",
    b"/.well-known/acme-challenge/AAAAAAAAAAAAAAAAAAAAAA%00",
])
def test_path_traversal_finds_nothing(inst: Instance, path: bytes) -> None:
    for tls in (False, True):
        answer = raw(inst, b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n",
                     tls=tls)
        code = status(answer)
        assert code in (400, 404, 308), answer[:200]
        assert b"root:" not in answer


def test_oversized_and_malformed_requests_get_4xx(inst: Instance) -> None:
    host = b"Host: " + HOST.encode() + b"\r\n"
    cases = [
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + host + b"\r\n",  # request line over 8190
        b"GET / HTTP/1.1\r\n" + host + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n",  # one field over 8190
        b"GET / HTTP/1.1\r\n" + host + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",  # 200 fields
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/9.9\r\n" + host + b"\r\n",
        b"GET / HTTP/1.1\r\n" + host + b"Content-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + host + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + host + b"Bad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS ClientHello on port 80
    ]
    for data in cases:
        answer = raw(inst, data)
        assert answer[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and answer[9:10] == b"4", (data[:60], answer[:200])


def test_body_over_the_limit_is_refused(inst: Instance) -> None:
    with https(inst) as c:
        r = c.post("/autodiscover/autodiscover.xml", headers={"Host": f"autodiscover.{DOMAIN}"},
                   content=b"x" * (200 * 1024))
        assert r.status_code in (404, 405, 413)


def test_slow_request_head_gets_408(inst: Instance) -> None:
    """A client that starts a request and stops (slowloris) is answered 408 and closed at the deadline."""
    for tls in (False, True):
        sock = socket.create_connection(("127.0.0.1", inst.port("https" if tls else "http")), timeout=20)
        if tls:
            sock = inst.client_ssl_context().wrap_socket(sock)
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Slow: ")
            t0 = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - t0 < 15


def test_idle_connection_is_closed(inst: Instance) -> None:
    with socket.create_connection(("127.0.0.1", inst.port("http")), timeout=20) as sock:
        assert sock.recv(4096) == b""  # closed at the deadline without a word


def test_connection_cap_per_ip(inst: Instance) -> None:
    socks = []
    try:
        for _ in range(8):
            socks.append(socket.create_connection(("127.0.0.1", inst.port("http")), timeout=10))
        # every slot is taken: the next one is told so and closed
        answer = raw(inst, b"", read=True)
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for s in socks:
            s.close()
    # the slots are released: a request works again (wait for the server to see the closes)
    deadline = time.monotonic() + 10
    while True:
        answer = raw(inst, b"GET /x HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n")
        if not answer.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer.startswith(b"HTTP/1.1 308")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_under_floods(inst: Instance) -> None:
    """Endless header bytes and endless bodies are cut off early: the server's memory does not follow."""
    assert inst.proc is not None
    before = _rss_kib(inst.proc.pid)
    junk = b"X-Flood: " + b"z" * 65536
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", inst.port("http")), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
            sent = 0
            try:
                while sent < 32 * 1024 * 1024:
                    s.sendall(junk)
                    sent += len(junk)
            except OSError:
                pass  # the server gave up on us: that is the point
            assert sent < 32 * 1024 * 1024
    after = _rss_kib(inst.proc.pid)
    assert after - before < 32 * 1024, (before, after)
