"""The in-process test DNS server: answers dnspython over UDP and TCP, live zone edits, clean stop."""

from __future__ import annotations

import socket
import struct
import time

import dns.message
import dns.query
import dns.rcode

from tests.dnsserver import DNSServer


def test_udp_and_tcp_same_port_and_stop() -> None:
    server = DNSServer().start()
    try:
        server.add("a.test", "A", "127.0.0.2")
        q = dns.message.make_query("a.test", "A")
        udp = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=2)
        tcp = dns.query.tcp(q, "127.0.0.1", port=server.port, timeout=2)
        assert udp.answer[0][0].address == tcp.answer[0][0].address == "127.0.0.2"
        assert udp.flags & dns.flags.AA
        assert server.nameserver == f"127.0.0.1:{server.port}"
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the port is released
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


def test_live_edits_rcodes_and_truncation() -> None:
    with DNSServer() as server:
        def ask(name: str, rtype: str, size: int | None = None) -> dns.message.Message:
            q = dns.message.make_query(name, rtype, use_edns=size is not None, payload=size or 512)
            return dns.query.udp(q, "127.0.0.1", port=server.port, timeout=2)

        assert ask("b.test", "TXT").rcode() == dns.rcode.NXDOMAIN
        server.add("x.b.test", "TXT", "t")
        assert ask("b.test", "TXT").rcode() == dns.rcode.NOERROR and not ask("b.test", "TXT").answer
        server.remove("x.b.test")
        assert ask("b.test", "TXT").rcode() == dns.rcode.NXDOMAIN
        server.servfail("sf.test")
        assert ask("sf.test", "A").rcode() == dns.rcode.SERVFAIL
        server.add("big.test", "TXT", "y" * 700)
        small = ask("big.test", "TXT")
        assert small.flags & dns.flags.TC and not small.answer
        big = ask("big.test", "TXT", size=4096)
        assert [len(s) for s in big.answer[0][0].strings] == [255, 255, 190]  # RFC 1035 §3.3.14
        server.add_ptr("192.0.2.5", "h.test")
        assert ask("5.2.0.192.in-addr.arpa", "PTR").answer[0][0].target.to_text() == "h.test."
        server.clear()
        assert ask("big.test", "TXT").rcode() == dns.rcode.NXDOMAIN


def test_garbage_and_split_tcp_frames() -> None:
    with DNSServer() as server:
        server.add("a.test", "A", "127.0.0.9")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.3)
            u.sendto(b"\x00garbage", ("127.0.0.1", server.port))
            try:
                u.recvfrom(512)
                raise AssertionError("garbage got an answer")
            except TimeoutError:
                pass
        wire = dns.message.make_query("a.test", "A").to_wire()
        frame = struct.pack("!H", len(wire)) + wire
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as t:
            for i in range(len(frame)):  # one byte at a time
                t.sendall(frame[i:i + 1])
            length = struct.unpack("!H", t.recv(2))[0]
            data = b""
            for _ in range(10):
                data += t.recv(length - len(data))
                if len(data) == length:
                    break
            assert dns.message.from_wire(data).answer[0][0].address == "127.0.0.9"
