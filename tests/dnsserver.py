"""An authoritative in-process DNS server for tests (RFC 1035 over UDP and TCP, §4.2), built on dnslib.

    with DNSServer() as dns:
        dns.add("a.test", "MX", "10 mx.a.test.")
        dns.add("mx.a.test", "A", "127.0.0.2")
        dns.add("a.test", "TXT", "v=spf1 ip4:127.0.0.2 -all")
        dns.add_ptr("127.0.0.2", "mx.a.test")
        dns.servfail("broken.test")
        dns.timeout("slow.test")
        Resolver([dns.nameserver])          # "127.0.0.1:PORT"

Records have TTL 0 unless a test gives one, so the resolvers under test cache nothing and a test may
change the zone while servers run; a test of caching passes `ttl=`. Negative answers carry no SOA
and are therefore not cached either (RFC 2308 §5).

UDP and TCP listen on the same free port of 127.0.0.1 (port 0 bound first). The zone is data that
tests may change while the server runs. Every name is in the server's zone: unknown names are
NXDOMAIN, known names without the asked type NODATA (also names that only have children, RFC 8020).
TXT values longer than 255 octets are split into 255-octet character-strings (RFC 1035 §3.3.14);
UDP answers bigger than the client's buffer (512, or its EDNS size) come back truncated so the
client retries over TCP. One background thread serves both sockets with a selector; `stop()` ends
it within a tenth of a second.
"""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
import struct
import threading
from collections import deque
from types import TracebackType
from typing import Any, Self

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

MAX_TCP_CONNECTIONS = 64
MAX_TCP_BUFFER = 70_000
MAX_CNAME_CHAIN = 8


def _key(name: str) -> str:
    name = name.strip().lower()
    return name if name == "." else name.rstrip(".")


def reverse_pointer(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "A":
        return A(str(ipaddress.IPv4Address(value)))
    if rtype == "AAAA":
        return AAAA(str(ipaddress.IPv6Address(value)))
    if rtype == "MX":
        pref, host = value if isinstance(value, tuple) else str(value).split()
        return MX(host, int(pref))
    if rtype == "CNAME":
        return CNAME(str(value))
    if rtype == "PTR":
        return PTR(str(value))
    if rtype == "TXT":
        if isinstance(value, (list, tuple)):  # explicit character-strings
            return TXT([v.encode() if isinstance(v, str) else bytes(v) for v in value])
        data = value.encode() if isinstance(value, str) else bytes(value)
        return TXT([data[i:i + 255] for i in range(0, len(data), 255)] or [b""])
    # anything else in zone-file syntax, e.g. add("_25._tcp.mx.test", "TLSA", "3 1 1 ab12...")
    return RR.fromZone(f"x. 60 IN {rtype} {value}")[0].rdata


class DNSServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """port 0: a free port; a fixed one (53, as root) serves programs that read resolv.conf."""
        self.host = host
        self.port = 0
        self._want_port = port
        self._lock = threading.Lock()
        self._zone: dict[tuple[str, str], list[tuple[Any, int]]] = {}
        self._servfail: set[str] = set()
        #: When positive, negative answers (NXDOMAIN, NODATA) carry an SOA with this TTL and MINIMUM in
        #: their authority section, so that resolvers may cache them (RFC 2308 §3, §5).
        self.negative_ttl = 0
        self._refused: set[str] = set()
        self._timeout: set[str] = set()
        self._secure: set[str] = set()  # names answered with the AD bit (as a validating resolver would)
        self.queries: deque[tuple[str, str, str]] = deque(maxlen=10_000)  # (name, type, "udp"|"tcp")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # zone editing -------------------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: Any, ttl: int = 0) -> None:
        rtype = rtype.upper()
        rdata = _rdata(rtype, value)
        with self._lock:
            self._zone.setdefault((_key(name), rtype), []).append((rdata, ttl))

    def add_ptr(self, ip: str, host: str) -> None:
        self.add(reverse_pointer(ip), "PTR", host)

    def remove(self, name: str, rtype: str | None = None) -> None:
        key = _key(name)
        with self._lock:
            for k in [k for k in self._zone if k[0] == key and (rtype is None or k[1] == rtype.upper())]:
                del self._zone[k]
            self._servfail.discard(key)
            self._refused.discard(key)
            self._timeout.discard(key)

    def clear(self) -> None:
        with self._lock:
            self._zone.clear()
            self._servfail.clear()
            self._refused.clear()
            self._timeout.clear()
            self._secure.clear()

    def secure(self, name: str, on: bool = True) -> None:
        """Answers for `name` carry the AD bit: DNSSEC-validated, as from a validating resolver."""
        with self._lock:
            (self._secure.add if on else self._secure.discard)(_key(name))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_key(name))

    def refused(self, name: str) -> None:
        with self._lock:
            self._refused.add(_key(name))

    def timeout(self, name: str) -> None:
        """Queries for `name` get no answer at all."""
        with self._lock:
            self._timeout.add(_key(name))

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # answering ----------------------------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(k[0] == name or k[0].endswith(suffix) for k in self._zone)

    def answer(self, request: DNSRecord, transport: str) -> DNSRecord | None:
        reply = request.reply()  # qr, aa, ra; the question copied
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return reply
        q = request.questions[0]
        name, qtype = _key(str(q.qname)), QTYPE.get(q.qtype)
        with self._lock:
            self.queries.append((name, str(qtype), transport))
            # RFC 4035 §3.2.3 / RFC 6840 §5.7: AD only for what "validated" (dnslib's reply() copies
            # the query's AD flag, which our resolver sets to ask for it)
            reply.header.ad = 1 if name in self._secure else 0
            if name in self._timeout:
                return None
            if name in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if name in self._refused:
                reply.header.rcode = RCODE.REFUSED
                return reply
            owner = str(q.qname)
            for _ in range(MAX_CNAME_CHAIN):
                records = self._zone.get((name, qtype))
                if records:
                    for rdata, ttl in records:
                        reply.add_answer(RR(owner, q.qtype, rdata=rdata, ttl=ttl))
                    return reply
                cname = self._zone.get((name, "CNAME"))
                if not cname or qtype == "CNAME":
                    break
                rdata, ttl = cname[0]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=rdata, ttl=ttl))
                owner = str(rdata.label)
                name = _key(owner)
            if not reply.rr and not self._exists(name):
                reply.header.rcode = RCODE.NXDOMAIN
            if not reply.rr and self.negative_ttl > 0:
                zone = ".".join(name.split(".")[-2:]) + "."
                reply.add_auth(RR(zone, QTYPE.SOA, ttl=self.negative_ttl, rdata=SOA(
                    "ns." + zone, "hostmaster." + zone, (1, 3600, 600, 86400, self.negative_ttl))))
            return reply

    def _handle(self, data: bytes, transport: str, limit: int | None) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - garbage in: no answer, like many servers
            return None
        reply = self.answer(request, transport)
        if reply is None:
            return None
        packed: bytes = reply.pack()
        if limit is not None:
            size = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    size = max(512, rr.rclass)  # RFC 6891 §6.2.3: the requestor's UDP payload size
            if len(packed) > size:
                reply.rr = []
                reply.header.tc = 1
                packed = reply.pack()
        return packed

    # lifecycle ----------------------------------------------------------------------------------
    def _bind(self) -> None:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self._want_port))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE or self._want_port:
                    raise
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError("no free port with both UDP and TCP available")

    def start(self) -> Self:
        self._bind()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dnsserver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    if key.data == "udp":
                        self._on_udp(sock)
                    elif key.data == "listen":
                        self._on_accept(sock, sel, buffers)
                    else:
                        self._on_tcp(sock, sel, buffers)
        finally:
            for conn in list(buffers):
                conn.close()
            sel.close()
            self._udp.close()
            self._tcp.close()

    def _on_udp(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded drain
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            out = self._handle(data, "udp", limit=512)
            if out is not None:
                try:
                    sock.sendto(out, addr)
                except OSError:
                    pass

    def _on_accept(self, sock: socket.socket, sel: selectors.BaseSelector,
                   buffers: dict[socket.socket, bytearray]) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if len(buffers) >= MAX_TCP_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(2.0)  # replies are small; a stuck client cannot hold the thread for long
        buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ, "tcp")

    def _on_tcp(self, conn: socket.socket, sel: selectors.BaseSelector,
                buffers: dict[socket.socket, bytearray]) -> None:
        def close() -> None:
            sel.unregister(conn)
            buffers.pop(conn, None)
            conn.close()

        try:
            data = conn.recv(65535)
        except OSError:
            close()
            return
        if not data:
            close()
            return
        buf = buffers[conn]
        buf += data
        if len(buf) > MAX_TCP_BUFFER:
            close()
            return
        while len(buf) >= 2:  # RFC 1035 §4.2.2: two-octet length prefix
            (length,) = struct.unpack("!H", buf[:2])
            if len(buf) < 2 + length:
                break
            msg = bytes(buf[2:2 + length])
            del buf[:2 + length]
            out = self._handle(msg, "tcp", limit=None)
            if out is not None:
                try:
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    close()
                    return

