"""The asyncio driver of the outbound SMTP client (RFC 5321) over the sans-IO core `proto.smtp.client`.

A short loop: write what the core queued, read until the replies it expects have arrived. On top of
it, the steps a delivery needs: greeting, EHLO (HELO fallback), opportunistic STARTTLS (RFC 3207)
with the certificate checked afterwards and the result recorded, AUTH PLAIN for a smarthost
(RFC 4954), and one mail transaction with PIPELINING (RFC 2920) when offered, returning one reply
per recipient. The connection stays open for the next transaction (reuse).

This driver lives beside the queue (the only code that dials out) rather than in `server/`, which
holds the listeners.

Certificates: the TLS handshake itself does not verify (a verification failure would abort the
handshake, and opportunistic TLS must still encrypt); the peer's chain is then verified with
`cryptography`'s X.509 path validation against the system CA store (plus `outbound.ca_file`) and the
MX host name, and the answer is recorded. With `tls_policy = "verify"` an unverified certificate
ends the attempt as a temporary failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification

from ..proto.smtp.client import NEED_DATA, ClientConnection, ClientSettings, Closed, ServerReply
from ..proto.smtp.errors import ProtocolError, UsageError
from ..resolver import TLSARecord
from .dane import match_chain

log = logging.getLogger("postier.queue.client")

CHUNK = 64 * 1024
READ_SIZE = 65536


class ConnectionFailed(Exception):
    """The session with this host could not go on (refused, timeout, closed, protocol error)."""


@dataclass(frozen=True)
class TLSResult:
    version: str = ""
    cipher: str = ""
    verified: bool = False
    reason: str = ""  # why not verified

    def __str__(self) -> str:
        if not self.version:
            return "none"
        state = "verified" if self.verified else f"unverified ({self.reason})" if self.reason else "unverified"
        return f"{self.version} {self.cipher} {state}"


@dataclass
class Transaction:
    """One message to send: envelope, ESMTP parameters and the content (CRLF lines, not stuffed)."""

    sender: str
    recipients: list[tuple[str, dict[str, str | None]]]
    data: bytes | Path  # the content, or the spool file holding it (read in chunks from a thread)
    mail_params: dict[str, str | None] = field(default_factory=dict)


@dataclass
class TransactionResult:
    replies: dict[str, ServerReply]  # recipient -> the reply that decides its fate
    mail: ServerReply | None = None


# -- certificate verification ------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _trust_store(extra: str | None) -> verification.Store | None:
    """The system CA bundle (the first one found) plus `extra`; parsed once."""
    certs: list[x509.Certificate] = []
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile):
        if name and not certs:
            certs.extend(_load_pems(name))
    if extra:
        certs.extend(_load_pems(extra))
    return verification.Store(certs) if certs else None


def _load_pems(name: str) -> list[x509.Certificate]:
    try:
        data = Path(name).read_bytes()
    except OSError:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old roots with non-positive serials: still usable anchors
        return _parse_pems(data)


def _parse_pems(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:  # one odd certificate: load the others one by one
        out = []
        marker = b"-----END CERTIFICATE-----"
        for block in data.split(marker):
            if b"-----BEGIN CERTIFICATE-----" in block:
                with contextlib.suppress(ValueError):
                    out.append(x509.load_pem_x509_certificate(block + marker))
        return out


def verify_chain(chain: list[bytes], hostname: str, extra_ca: Path | None = None,
                 now: datetime.datetime | None = None) -> tuple[bool, str]:
    """RFC 6125 / RFC 5280: does the DER `chain` (leaf first) lead to a trusted root for `hostname`?"""
    if not chain:
        return False, "no certificate"
    store = _trust_store(str(extra_ca) if extra_ca else None)
    if store is None:
        return False, "no CA store"
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        inter = [x509.load_der_x509_certificate(c) for c in chain[1:10]]
        # Web PKI rules for the CAs; for the server certificate only what identifies it (a SAN),
        # since mail servers' certificates often deviate from the CA/Browser Forum profile in
        # ways (a critical SAN, say) that do not weaken the identity check.
        ee = verification.ExtensionPolicy.permit_all().require_present(
            x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
        builder = verification.PolicyBuilder().store(store).extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
        if now is not None:
            builder = builder.time(now)
        verifier = builder.build_server_verifier(x509.DNSName(hostname))
        verifier.verify(leaf, inter)
    except (verification.VerificationError, ValueError) as exc:
        return False, str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
    return True, ""


def client_tls_context() -> ssl.SSLContext:
    """Encrypt with anything reasonable; verification happens afterwards (see the module docstring)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- the driver --------------------------------------------------------------------------------------

class SMTPClient:
    """One client connection; create with `connect()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, ip: str,
                 command_timeout: float, lmtp: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.ip = ip
        self.command_timeout = command_timeout
        self.conn = ClientConnection(ClientSettings(lmtp=lmtp))
        self.tls = TLSResult()
        self.greeting: ServerReply | None = None
        self.transactions = 0

    @classmethod
    async def connect(cls, host: str, ip: str, port: int, *, source: str | None, connect_timeout: float,
                      command_timeout: float, implicit_tls: ssl.SSLContext | None = None) -> SMTPClient:
        """Open a TCP connection to ip:port (from `source` when given); raises ConnectionFailed."""
        local = (source, 0) if source else None
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    ip, port, local_addr=local, limit=READ_SIZE,
                    ssl=implicit_tls, server_hostname=host if implicit_tls else None)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"connect to {host}[{ip}]:{port}: {_why(exc)}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer, host, ip, command_timeout)
        if implicit_tls is not None:
            client._record_tls()
        return client

    # -- plumbing ---------------------------------------------------------------------------------

    async def _send_pending(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def replies(self, n: int, timeout: float | None = None) -> list[ServerReply]:
        """Flush, then wait for `n` replies. A 421 ends the session: it answers every outstanding command."""
        out: list[ServerReply] = []
        try:
            async with asyncio.timeout(timeout or self.command_timeout):
                await self._send_pending()
                while len(out) < n:
                    ev = self.conn.next_event()
                    if ev is NEED_DATA:
                        self.conn.receive_data(await self.reader.read(READ_SIZE))
                    elif isinstance(ev, Closed):
                        raise ConnectionFailed(f"{self.host}[{self.ip}] closed the connection")
                    else:
                        assert isinstance(ev, ServerReply)
                        out.append(ev)
                        if ev.code == 421:  # RFC 5321 §3.8: the server is closing
                            out.extend([ev] * (n - len(out)))
        except TimeoutError:
            raise ConnectionFailed(f"timeout waiting for {self.host}[{self.ip}]") from None
        except ProtocolError as exc:
            raise ConnectionFailed(f"protocol error from {self.host}[{self.ip}]: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"lost connection with {self.host}[{self.ip}]: {_why(exc)}") from None
        return out

    async def reply(self) -> ServerReply:
        return (await self.replies(1))[0]

    @property
    def closed(self) -> bool:
        return self.conn.closed or self.writer.is_closing()

    # -- steps --------------------------------------------------------------------------------------

    async def greet(self) -> ServerReply:
        self.greeting = await self.reply()
        return self.greeting

    async def hello(self, name: str) -> ServerReply:
        """EHLO, falling back to HELO on a 5xx (RFC 5321 §3.2)."""
        self.conn.ehlo(name)
        r = await self.reply()
        if 500 <= r.code < 600:
            self.conn.helo(name)
            r = await self.reply()
        return r

    async def starttls(self, ctx: ssl.SSLContext, hello_name: str, timeout: float = 30.0) -> ServerReply | None:
        """RFC 3207: STARTTLS, handshake, EHLO again. None when the server refused STARTTLS (4xx/5xx)."""
        self.conn.starttls()
        r = await self.reply()
        if r.code != 220:
            return None
        try:
            await self.writer.start_tls(ctx, server_hostname=self.host, ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise ConnectionFailed(f"TLS handshake with {self.host}[{self.ip}] failed: {_why(exc)}") from None
        self.conn.tls_started()
        self._record_tls()
        return await self.hello(hello_name)

    def _record_tls(self) -> None:
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return
        cipher = obj.cipher()
        self.tls = TLSResult(obj.version() or "", cipher[0] if cipher else "")

    async def verify_tls(self, extra_ca: Path | None) -> TLSResult:
        """Verify the peer's certificate chain for the MX host name (in a thread: it parses X.509)."""
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return self.tls
        chain = [bytes(c) for c in (obj.get_unverified_chain() or [])]  # DER, leaf first
        ok, why = await asyncio.to_thread(verify_chain, chain, self.host, extra_ca)
        self.tls = TLSResult(self.tls.version, self.tls.cipher, ok, why)
        return self.tls

    async def verify_dane(self, records: Sequence[TLSARecord]) -> TLSResult:
        """RFC 7672 §3: does the peer's chain match one of the MX host's (usable) TLSA records?"""
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return self.tls
        chain = [bytes(c) for c in (obj.get_unverified_chain() or [])]
        ok, why = await asyncio.to_thread(match_chain, chain, records, self.host)
        self.tls = TLSResult(self.tls.version, self.tls.cipher, ok, "" if ok else f"DANE: {why}")
        return self.tls

    async def auth_plain(self, user: str, password: str) -> ServerReply:
        self.conn.auth_plain(user, password)  # RFC 4616 with SASL-IR (RFC 4954 §4)
        return await self.reply()

    async def send(self, txn: Transaction) -> TransactionResult:
        """One mail transaction; every recipient gets the reply that decides it (RFC 5321 §3.3)."""
        conn = self.conn
        self.transactions += 1
        rcpts = [r for r, _ in txn.recipients]
        if conn.pipelining:  # RFC 2920 §3.1: MAIL, RCPT... and DATA in one group
            conn.mail(txn.sender, txn.mail_params)
            for r, params in txn.recipients:
                conn.rcpt(r, params)
            conn.data()
            got = await self.replies(len(rcpts) + 2)
            mail, rcpt_replies, data = got[0], got[1:-1], got[-1]
        else:
            conn.mail(txn.sender, txn.mail_params)
            mail = await self.reply()
            rcpt_replies = []
            data = None
            if mail.is_success:
                for r, params in txn.recipients:
                    conn.rcpt(r, params)
                    rcpt_replies.append(await self.reply())
                    if rcpt_replies[-1].code == 421:
                        break
        if not mail.is_success:
            if data is not None and data.code == 354:  # a broken server: end the empty content
                conn.end_data()
                await self.reply()
            return TransactionResult({r: mail for r in rcpts}, mail)
        replies: dict[str, ServerReply] = {}
        accepted = []
        for r, rep in zip(rcpts, rcpt_replies, strict=False):
            replies[r] = rep
            if rep.is_success:
                accepted.append(r)
        for r in rcpts[len(rcpt_replies):]:  # cut short by a 421
            replies[r] = rcpt_replies[-1]
        if not accepted:
            if data is not None and data.code == 354:
                conn.end_data()  # RFC 2920 §3.1: no recipient, yet 354: send an empty message's end
                await self.reply()
            elif not self.conn.closed:
                conn.rset()
                await self.reply()
            return TransactionResult(replies, mail)
        if data is None:
            conn.data()
            data = await self.reply()
        if data.code != 354:
            for r in accepted:
                replies[r] = data
            if not self.conn.closed:  # the transaction is still open on the server: clear it
                conn.rset()
                await self.reply()
            return TransactionResult(replies, mail)
        try:
            if isinstance(txn.data, bytes) and len(txn.data) <= 4 * CHUNK:
                conn.send_message_data(txn.data)  # small: content and final dot leave in one write
            else:
                async for chunk in _chunks(txn.data):
                    conn.send_message_data(chunk)
                    async with asyncio.timeout(self.command_timeout):
                        await self._send_pending()
            conn.end_data()
        except (OSError, TimeoutError, UsageError) as exc:
            raise ConnectionFailed(f"lost connection with {self.host}[{self.ip}] during data: {_why(exc)}") from None
        # RFC 5321 §4.5.3.2.6: wait up to 10 minutes for the reply to the final dot
        final = (await self.replies(1, timeout=self.command_timeout * 2))[0]
        for r in accepted:
            replies[r] = final
        return TransactionResult(replies, mail)

    async def reset(self) -> bool:
        """RSET between transactions on a reused connection; False if the connection is unusable."""
        if self.closed:
            return False
        try:
            self.conn.rset()
            return (await self.reply()).is_success
        except (ConnectionFailed, UsageError):
            return False

    async def quit(self) -> None:
        """QUIT politely (RFC 5321 §4.1.1.10), then close; never raises."""
        try:
            if not self.closed:
                self.conn.quit()
                await self.replies(1, timeout=5)
        except (ConnectionFailed, UsageError):
            pass
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _chunks(data: bytes | Path) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
        return
    f = await asyncio.to_thread(open, data, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, 16 * CHUNK):
            yield chunk
    finally:
        f.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__
