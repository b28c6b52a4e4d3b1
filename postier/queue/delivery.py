"""One delivery attempt to one destination: routing (RFC 5321 §5.1, RFC 7505 null MX), the hosts to
try in order, session set-up (EHLO, STARTTLS, AUTH for a smarthost) and the fate of each recipient
(RFC 5321 §4.2.1: 2yz delivered, 4yz deferred, 5yz failed).

The logic object of STYLE.md §7: `Router` decides where to go, `Connector` walks the hosts until a
session is up (connection-level trouble moves on to the next host, as RFC 5321 §5.1 asks), and
`transact()` runs one message over an open session. The runner (`runner.py`) strings them together,
reusing a session for several messages to the same destination.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..proto.smtp.address import xtext_encode
from ..proto.smtp.client import ServerReply
from ..resolver import BaseResolver, DNSStatus, RouteStatus, TLSARecord
from .client import ConnectionFailed, SMTPClient, TLSResult, Transaction, client_tls_context
from .dane import usable
from .mtasts import Policy, PolicyCache
from .spool import MessageInfo, RecipientState

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("postier.queue")

MAX_ADDRESSES = 5  # Postfix smtp_mx_address_limit: addresses tried per attempt
MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: every server takes at least 100
_UNSPECIFIED = ("", "*", "0.0.0.0", "::", "localhost")


class Fate(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class Failure:
    """Why an attempt could not even reach a transaction (applies to every recipient of it)."""

    fate: Fate
    reply: str  # "DNS: SERVFAIL ..." or the remote reply "421 4.3.2 ..."
    status_code: str  # RFC 3463
    mx: str = ""
    remote_mta: str = ""
    tls: str = ""
    remote: bool = False  # the reply came from the remote server (a DSN Diagnostic-Code)

    def result(self, address: str) -> RcptResult:
        return RcptResult(address, self.fate, self.reply, self.status_code, self.remote_mta, self.mx, self.tls,
                          remote=self.remote)


@dataclass(frozen=True)
class RcptResult:
    address: str
    fate: Fate
    reply: str
    status_code: str
    remote_mta: str = ""
    mx: str = ""
    tls: str = ""
    remote: bool = False  # `reply` is the remote server's reply
    dsn_passed: bool = False  # the remote took our NOTIFY/ORCPT (RFC 3461 DSN extension)


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    port: int
    #: TLS with a certificate verified for `name` is required (MTA-STS enforce, RFC 8461 §4.2, §5.1).
    strict: bool = False
    #: DANE applies (RFC 7672 §2.2: secure MX, address and TLSA answers): TLS is mandatory, and the
    #: chain must match one of `tlsa` when it holds usable records.
    dane: bool = False
    tlsa: tuple[TLSARecord, ...] = ()
    #: The domain has an MTA-STS policy in mode testing: deliver as usual, log what enforce would refuse.
    sts_testing: bool = False

    def __str__(self) -> str:
        return f"{self.name}[{self.ip}]:{self.port}"


@dataclass(frozen=True)
class Route:
    hosts: tuple[Host, ...] = ()
    failure: Failure | None = None
    domain: str = ""  # the recipient domain (RFC 8460's policy domain); "" for the smarthost
    sts: Policy | None = None  # its MTA-STS policy in force (mode testing or enforce)


#: Told of each host's session attempt (TLS reporting, `queue/tlsrpt.py`): the route, the host, the
#: session's TLS state when it came up, else the failure.
SessionHook = Callable[[Route, Host, TLSResult | None, "Failure | None"], Awaitable[None]]


@dataclass(frozen=True)
class Outbound:
    """Everything about dialling out, from the configuration."""

    helo: str
    port: int = 25
    source: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    tls_policy: str = "opportunistic"
    ca_file: Path | None = None
    dane: bool = True
    relay_host: str = ""
    relay_port: int = 587
    relay_tls: str = "starttls"
    relay_user: str = ""
    relay_password: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> Outbound:
        source = cfg.outbound.source_address or None
        if source is None:
            smtp = cfg.listeners.get("smtp")
            if smtp is not None and smtp.address not in _UNSPECIFIED:
                source = smtp.address  # SPF and reverse DNS match the address we receive on
        password = ""
        if cfg.relay.host and cfg.relay.password_file:
            pw_path = Path(cfg.relay.password_file)
            if not pw_path.is_absolute() and cfg.source is not None:
                pw_path = cfg.source.parent / pw_path
            try:
                password = pw_path.read_text().strip("\r\n")
            except OSError as exc:
                raise ConfigError(f"relay.password_file: cannot read {pw_path}: {exc.strerror}") from None
        return cls(helo=cfg.helo_name, port=cfg.outbound.smtp_port, source=source,
                   connect_timeout=cfg.queue.connect_timeout, command_timeout=cfg.queue.command_timeout,
                   tls_policy=cfg.outbound.tls_policy, ca_file=cfg.outbound.ca_file, dane=cfg.outbound.dane,
                   relay_host=cfg.relay.host, relay_port=cfg.relay.port, relay_tls=cfg.relay.tls,
                   relay_user=cfg.relay.username, relay_password=password)

    @property
    def relay(self) -> bool:
        return bool(self.relay_host)

    def destination(self, domain: str) -> str:
        """The queue groups recipients by this key: the domain, or the smarthost for everything."""
        return f"[{self.relay_host}]:{self.relay_port}" if self.relay else domain


def reply_text(r: ServerReply) -> str:
    return f"{r.code} {r.enhanced + ' ' if r.enhanced else ''}{r.text}".strip()[:900]


def status_of(r: ServerReply) -> str:
    """RFC 3463 code of a reply: its enhanced code, else derived from the basic code class."""
    if r.enhanced:
        return r.enhanced
    return f"{r.code // 100}.0.0"


def fate_of(code: int) -> Fate:
    if code < 400:
        return Fate.DELIVERED
    return Fate.DEFERRED if code < 500 else Fate.FAILED


def _family_ok(ip: str, source: str | None) -> bool:
    if source is None:
        return True
    try:
        return ipaddress.ip_address(ip).version == ipaddress.ip_address(source).version
    except ValueError:
        return True


class Router:
    """Where to connect for a destination: MX hosts and their addresses, or the smarthost."""

    def __init__(self, resolver: BaseResolver, out: Outbound, rng: random.Random | None = None,
                 sts: PolicyCache | None = None) -> None:
        self.resolver = resolver
        self.out = out
        self.rng = rng or random.Random()
        self.sts = sts

    async def route(self, domain: str, tls_optional: bool = False) -> Route:
        """With `tls_optional` (a TLS report, RFC 8460 §5.3): no MTA-STS, no DANE, nothing recorded."""
        out = self.out
        if out.relay:
            return await self._hosts([(out.relay_host, 0)], out.relay_port, implicit=False)
        if domain.startswith("[") or not domain:
            return Route(failure=Failure(Fate.FAILED, f"cannot route to {domain!r}", "5.1.2"))
        try:
            name = domain.encode("idna").decode("ascii")  # RFC 5890: DNS sees A-labels
        except UnicodeError:
            return Route(failure=Failure(Fate.FAILED, f"invalid domain {domain!r}", "5.1.2"))
        mx = await self.resolver.mx_hosts(name, self.rng)
        if mx.status is RouteStatus.TEMPFAIL:
            # DESIGN.md: DNS trouble is a temporary failure, never a bounce (RFC 5321 §5.1 does not
            # allow falling back to the A record when the MX lookup failed)
            return Route(failure=Failure(Fate.DEFERRED, f"DNS: MX lookup for {name} failed: {mx.reason}", "4.4.3"))
        if mx.status is RouteStatus.NULL_MX:
            # RFC 7505 §4.2: 556 5.1.10 "Recipient address has null MX"
            return Route(failure=Failure(Fate.FAILED, f"556 5.1.10 {name} does not accept mail (null MX)", "5.1.10"))
        if mx.status is RouteStatus.NXDOMAIN:
            return Route(failure=Failure(Fate.FAILED, f"Host or domain name not found: {name}", "5.1.2"))
        if mx.status is RouteStatus.NO_HOSTS:
            return Route(failure=Failure(Fate.FAILED, f"{name} has no MX and no address record", "5.4.4"))
        names = [(h.name, h.preference) for h in mx.hosts]
        strict = False
        policy = await self.sts.get(name) if self.sts is not None and not tls_optional else None
        if policy is not None and policy.mode != "none":
            unlisted = [h for h, _ in names if not policy.matches(h)]
            if unlisted:
                log.warning("mta-sts: %s: MX %s not in its %s policy (%s)", name, ",".join(unlisted), policy.mode,
                            ",".join(policy.mx))
            if policy.mode == "enforce":
                # RFC 8461 §5.1: never deliver to an MX the policy does not list; §4.2: TLS, verified
                names = [(h, p) for h, p in names if policy.matches(h)]
                strict = True
                if not names:
                    return Route(failure=Failure(Fate.DEFERRED, f"MTA-STS: no MX host of {name} matches its "
                                                 f"policy ({', '.join(policy.mx)})", "4.7.5"))
        route = await self._hosts(names, out.port, implicit=mx.implicit, strict=strict,
                                  secure=mx.secure and self.out.dane and not tls_optional,
                                  sts_testing=policy is not None and policy.mode == "testing")
        if tls_optional:
            return route
        return replace(route, domain=name, sts=policy if policy is not None and policy.mode != "none" else None)

    async def _hosts(self, names: list[tuple[str, int]], port: int, implicit: bool, strict: bool = False,
                     secure: bool = False, sts_testing: bool = False) -> Route:
        hosts: list[Host] = []
        tempfail: str | None = None
        for name, _pref in names:
            if len(hosts) >= MAX_ADDRESSES:
                break
            dane = False
            tlsa: tuple[TLSARecord, ...] = ()
            try:
                ipaddress.ip_address(name)
                addrs: tuple[str, ...] = (name,)
            except ValueError:
                ans = await self.resolver.addresses(name)
                if ans.status is DNSStatus.TEMPFAIL:
                    tempfail = f"DNS: address lookup for {name} failed: {ans.reason}"
                    continue
                addrs = tuple(ans.records)
                if secure and ans.secure:  # RFC 7672 §2.2.2: secure MX and address records
                    t = await self.resolver.tlsa(f"_{port}._tcp.{name}")
                    if t.status is DNSStatus.TEMPFAIL:  # RFC 7672 §2.2: the host is unusable, not insecure
                        tempfail = f"DNS: TLSA lookup for {name} failed: {t.reason}"
                        continue
                    if t.ok and t.secure:
                        dane, tlsa = True, tuple(usable(t.records))
            for ip in addrs:
                if _family_ok(ip, self.out.source) and len(hosts) < MAX_ADDRESSES:
                    # RFC 8461 §2: where DANE applies it takes precedence over MTA-STS
                    hosts.append(Host(name, ip, port, strict and not dane, dane, tlsa, sts_testing and not dane))
        if hosts:
            return Route(tuple(hosts))
        if tempfail:
            return Route(failure=Failure(Fate.DEFERRED, tempfail, "4.4.3"))
        return Route(failure=Failure(Fate.FAILED, "Host not found: no usable address for "
                                     + ", ".join(n for n, _ in names), "5.4.4"))


class Connector:
    """Opens a ready session (greeted, EHLO done, TLS and AUTH as configured) to the first host that works."""

    def __init__(self, out: Outbound, on_session: SessionHook | None = None) -> None:
        self.out = out
        self.tls_ctx = client_tls_context()
        self.on_session = on_session

    async def open(self, route: Route) -> tuple[SMTPClient | None, Failure | None]:
        assert route.failure is None
        last: Failure | None = None
        for host in route.hosts:
            session, failure = await self._open_one(host)
            if self.on_session is not None and route.domain:
                await self.on_session(route, host, session.tls if session is not None else None, failure)
            if session is not None:
                return session, None
            last = failure
            log.info("%s: %s", host, failure.reply if failure else "?")
        return None, last or Failure(Fate.DEFERRED, "no host to try", "4.4.1")

    async def _open_one(self, host: Host) -> tuple[SMTPClient | None, Failure | None]:
        out = self.out
        implicit = self.tls_ctx if out.relay and out.relay_tls == "implicit" else None
        mx = str(host)
        try:
            s = await SMTPClient.connect(host.name, host.ip, host.port, source=out.source,
                                         connect_timeout=out.connect_timeout, command_timeout=out.command_timeout,
                                         implicit_tls=implicit)
        except ConnectionFailed as exc:
            return None, Failure(Fate.DEFERRED, str(exc), "4.4.1", mx=mx)
        try:
            failure = await self._setup(s, host)
        except ConnectionFailed as exc:
            failure = Failure(Fate.DEFERRED, str(exc), "4.4.2", mx=mx, remote_mta=host.name)
        if failure is not None:
            await s.quit()
            return None, failure
        return s, None

    async def _setup(self, s: SMTPClient, host: Host) -> Failure | None:
        out = self.out
        mx = str(host)

        def remote(r: ServerReply) -> Failure:
            # RFC 5321 §5.1 / Postfix smtp_skip_5xx_greeting: a host that will not talk is a
            # reason to try the next one, and to retry later, not to bounce
            return Failure(Fate.DEFERRED, reply_text(r), "4.4.2" if r.code >= 500 else status_of(r), mx=mx,
                           remote_mta=host.name, remote=True)

        if s.tls.version and out.relay:  # implicit TLS to the smarthost (RFC 8314)
            await s.verify_tls(out.ca_file)
        greet = await s.greet()
        if greet.code != 220:
            return remote(greet)
        r = await s.hello(out.helo)
        if not r.is_success:
            return remote(r)
        must_verify = out.relay or out.tls_policy == "verify" or host.strict or bool(host.tlsa)
        must_tls = must_verify or host.dane
        if not s.tls.version:
            if s.conn.has("STARTTLS"):  # RFC 3207: opportunistic, whenever offered
                r2 = await s.starttls(self.tls_ctx, out.helo)
                if r2 is None:  # refused (454): go on in plaintext unless TLS is required
                    if must_tls:
                        return Failure(Fate.DEFERRED, "STARTTLS refused", "4.7.0", mx=mx, remote_mta=host.name)
                elif not r2.is_success:
                    return remote(r2)
                elif host.tlsa:
                    await s.verify_dane(host.tlsa)  # RFC 7672 §3: TLSA instead of the Web PKI
                else:
                    await s.verify_tls(out.ca_file)
            elif must_tls:
                return Failure(Fate.DEFERRED, "TLS is required but the server does not offer STARTTLS", "4.7.0",
                               mx=mx, remote_mta=host.name)
        if s.tls.version and not s.tls.verified and must_verify:
            return Failure(Fate.DEFERRED, f"certificate not verified: {s.tls.reason}", "4.7.5", mx=mx,
                           remote_mta=host.name, tls=str(s.tls))
        if host.sts_testing and not s.tls.verified:  # RFC 8461 §5: testing reports, never refuses
            log.warning("mta-sts: %s: the testing policy would refuse this host: %s", mx,
                        f"certificate not verified: {s.tls.reason}" if s.tls.version else "no TLS")
        log.info("%s: connected, TLS %s", mx, s.tls)
        if out.relay and out.relay_user:
            r = await s.auth_plain(out.relay_user, out.relay_password)
            if not r.is_success:
                return Failure(Fate.DEFERRED, "smarthost authentication failed: " + reply_text(r), "4.7.0",
                               mx=mx, remote_mta=host.name, remote=True)
        return None


async def transact(s: SMTPClient, msg: MessageInfo, rcpts: list[RecipientState], data: bytes | Path
                   ) -> list[RcptResult]:
    """Send one message to `rcpts` over an open session; one result per recipient, in order."""
    conn = s.conn
    mx, tls = f"{s.host}[{s.ip}]", str(s.tls)

    def local_fail(reply: str, status: str) -> list[RcptResult]:
        return [RcptResult(r.address, Fate.FAILED, reply, status, s.host, mx, tls) for r in rcpts]

    limit = conn.size_limit
    if limit is not None and msg.size > limit:  # RFC 1870 §6.1: do not send what will be refused
        return local_fail(f"message size {msg.size} exceeds the limit {limit} of {s.host}", "5.3.4")
    params: dict[str, str | None] = {}
    if conn.has("SIZE"):
        params["SIZE"] = str(msg.size)  # RFC 1870 §3
    needs_utf8 = msg.smtputf8 and not (msg.sender.isascii() and all(r.address.isascii() for r in rcpts)
                                       and not msg.eightbit)
    if msg.smtputf8:
        if conn.has("SMTPUTF8"):
            params["SMTPUTF8"] = None  # RFC 6531 §3.4
        elif needs_utf8:
            # RFC 6531 §3.2: a message that needs SMTPUTF8 cannot go to a server without it
            return local_fail(f"{s.host} does not support SMTPUTF8", "5.6.7")
    if msg.eightbit:
        if conn.has("8BITMIME"):
            params["BODY"] = "8BITMIME"  # RFC 6152 §3
        else:
            # RFC 6152 §3: 8-bit content may not go to a server without 8BITMIME; no downgrade here
            return local_fail(f"{s.host} does not support 8BITMIME and the message has 8-bit content", "5.6.3")
    dsn = conn.has("DSN")
    if dsn:  # RFC 3461 §4: pass the DSN parameters along so the next hop honours them
        if msg.ret:
            params["RET"] = msg.ret
        if msg.envid:
            params["ENVID"] = xtext_encode(msg.envid)
    recipients: list[tuple[str, dict[str, str | None]]] = []
    for r in rcpts:
        rp: dict[str, str | None] = {}
        if dsn:
            if r.notify:
                rp["NOTIFY"] = r.notify
            if r.orcpt:
                kind, _, value = r.orcpt.partition(";")
                rp["ORCPT"] = f"{kind};{xtext_encode(value)}"
        recipients.append((r.address, rp))
    txn = Transaction(msg.sender, recipients, data, params)
    try:
        res = await s.send(txn)
    except ConnectionFailed as exc:
        return [RcptResult(r.address, Fate.DEFERRED, str(exc), "4.4.2", s.host, mx, tls) for r in rcpts]
    out: list[RcptResult] = []
    for r in rcpts:
        rep = res.replies[r.address]
        out.append(RcptResult(r.address, fate_of(rep.code), reply_text(rep), status_of(rep), s.host, mx, tls,
                              remote=True, dsn_passed=dsn))
    return out
