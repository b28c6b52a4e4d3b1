"""Two quickstarts on one machine: different --listen addresses, the same --port-offset.

Each LMTP is a Unix socket in its own data directory, so nothing collides; both start, and mail goes
from one to the other by MX (the in-process DNS server) and back, and into each over its LMTP socket.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.dnsserver import DNSServer
from tests.harness import Instance, free_offset, port_free

ADDRS = {"a.test": "127.0.0.2", "b.test": "127.0.0.3"}


def shared_offset() -> int:
    for _ in range(50):
        off = free_offset(ADDRS["a.test"])
        if all(port_free(ADDRS["b.test"], p + off) for p in (25, 587, 465, 143, 993, 110, 995)):
            return off
    raise RuntimeError("no port offset free on both addresses")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Instance]]:
    off = shared_offset()
    with DNSServer() as dns:
        insts = {}
        for domain, ip in ADDRS.items():
            inst = Instance(tmp_path_factory.mktemp(domain[0]), domain, address=ip, offset=off)
            dns.add(domain, "MX", f"10 {inst.hostname}")
            dns.add(inst.hostname, "A", ip)
            inst.add_config(f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {25 + off}\n')
            inst.add_user(f"user@{domain}")
            insts[domain] = inst
        try:
            for inst in insts.values():
                inst.start()
            yield insts
        finally:
            for inst in insts.values():
                inst.stop()




def test_same_offset_different_addresses(pair: dict[str, Instance]) -> None:
    a, b = pair["a.test"], pair["b.test"]
    assert a.port("smtp") == b.port("smtp")
    assert a.lmtp_path != b.lmtp_path and a.lmtp_path.is_socket() and b.lmtp_path.is_socket()
    assert a.lmtp_path.stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize(("src", "dst"), [("a.test", "b.test"), ("b.test", "a.test")])
def test_exchange_mail_by_mx(pair: dict[str, Instance], src: str, dst: str) -> None:
    s_inst, d_inst = pair[src], pair[dst]
    marker = f"{src}-to-{dst}-{time.monotonic_ns()}"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # quickstart's self-signed certificate
    with smtplib.SMTP(*s_inst.addr("submission"), timeout=10) as s:
        s.starttls(context=ctx)
        s.login(f"user@{src}", "password123")
        s.sendmail(f"user@{src}", [f"user@{dst}"],
                   f"From: user@{src}\r\nTo: user@{dst}\r\nSubject: {marker}\r\n\r\nhi\r\n".encode())
    got = d_inst.wait_message(f"user@{dst}", marker.encode())
    assert f"Received: from {s_inst.hostname} ([{s_inst.address}])".encode() in got


def test_each_lmtp_socket_delivers_to_its_own_instance(pair: dict[str, Instance]) -> None:
    for domain, inst in pair.items():
        marker = f"lmtp-{domain}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(inst.lmtp_path))
            f = sock.makefile("rwb")

            def cmd(line: bytes, f=f) -> bytes:  # noqa: ANN001
                if line:
                    f.write(line + b"\r\n")
                    f.flush()
                while True:
                    reply = f.readline()
                    if reply[3:4] != b"-":
                        return reply

            assert cmd(b"").startswith(b"220")
            assert cmd(b"LHLO mta.test").startswith(b"250")
            assert cmd(b"MAIL FROM:<x@remote.test>").startswith(b"250")
            assert cmd(f"RCPT TO:<user@{domain}>".encode()).startswith(b"250")
            assert cmd(b"DATA").startswith(b"354")
            assert cmd(f"Subject: {marker}\r\n\r\nbody\r\n.".encode()).startswith(b"250")
        inst.wait_message(f"user@{domain}", marker.encode())
