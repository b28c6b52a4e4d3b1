"""Shared pieces of the deliverability tests: configs, envelopes, bodies, a zone loader."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RR

from postier.config import Config, Listener, MailAuth
from postier.message.types import Envelope, MessageBody, Recipient


def make_config(root: Path, hostname: str = "mx.b.test", **mailauth: Any) -> Config:
    return Config(hostname=hostname, data_dir=root, listeners={"smtp": Listener("127.0.0.1", 2525)},
                  mailauth=replace(MailAuth(), **mailauth))


def envelope(ip: str = "192.0.2.1", helo: str = "mx.a.test", mail_from: str = "alice@a.test",
             to: str = "bob@b.test") -> Envelope:
    env = Envelope(role="smtp", peer_ip=ip, helo=helo, esmtp=True)
    env.mail_from = mail_from
    env.recipients.append(Recipient(to))
    return env


def body(spool: Path, data: bytes, memory_limit: int = 256 * 1024) -> MessageBody:
    b = MessageBody(spool, memory_limit)
    for i in range(0, len(data), 1000):  # as the session writes it: in pieces
        b.write(data[i:i + 1000])
    return b


def load_zone(dns: Any, text: str) -> int:
    """Publish zone-file lines (what `postier dns records` prints) on the test DNS server."""
    n = 0
    for rr in RR.fromZone(text):
        rtype = QTYPE[rr.rtype]
        name = str(rr.rname)
        if rtype == "TXT":
            dns.add(name, "TXT", [bytes(s) for s in rr.rdata.data])
        elif rtype == "MX":
            dns.add(name, "MX", f"{rr.rdata.preference} {rr.rdata.label}")
        elif rtype in ("PTR", "CNAME"):
            dns.add(name, rtype, str(rr.rdata.label))
        else:
            dns.add(name, rtype, str(rr.rdata))
        n += 1
    return n
