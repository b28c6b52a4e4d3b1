"""Typed, frozen configuration loaded from one TOML file; every validation error names its key.

The file maps onto the dataclasses below one to one: a table per dataclass, a key per field.
Unknown keys are errors (a typo must not silently fall back to a default), and so are values of the
wrong type or out of range. `load_config()` raises `ConfigError("key: problem")`; the CLI prints that
one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .tlsprofile import server_context


class DataclassInstance(Protocol):
    """What every dataclass has (the shape typeshed names in `_typeshed`, which only exists for checkers)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

#: Every listener role postier knows, with its standard port (the port offset is added to these).
STANDARD_PORTS: dict[str, int] = {
    "smtp": 25,  # RFC 5321 MX
    "submission": 587,  # RFC 6409
    "submissions": 465,  # RFC 8314 implicit TLS
    "imap": 143,  # RFC 9051
    "imaps": 993,  # RFC 8314
    "pop3": 110,  # RFC 1939
    "pop3s": 995,  # RFC 8314
    "lmtp": 24,  # RFC 2033
    "http": 80,  # ACME http-01 (RFC 8555 §8.3), autoconfig; everything else redirects to https
    "https": 443,  # MTA-STS policy (RFC 8461 §3.3), autoconfig, autodiscover
    "managesieve": 4190,  # RFC 5804
}
#: Roles whose socket speaks TLS from the first byte (RFC 8314 §3.3).
IMPLICIT_TLS_ROLES = frozenset({"submissions", "imaps", "pop3s", "https"})
#: Roles served by the HTTP layer (postier/http) rather than by a mail session.
HTTP_ROLES = frozenset({"http", "https"})

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    """A configuration problem; str() is one line that starts with the offending key."""


def valid_domain(name: str) -> bool:
    """True for a syntactically valid (A-label, lower-case) DNS domain name."""
    return bool(_DOMAIN_RE.match(name))


def normalize_domain(name: str) -> str:
    """Lower-case a domain and convert U-labels to A-labels (IDNA); raise ValueError if invalid."""
    name = name.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"invalid domain {name!r}") from exc
    if not valid_domain(name):
        raise ValueError(f"invalid domain {name!r}")
    return name


@dataclass(frozen=True)
class Listener:
    """One listening socket for one role."""

    address: str = "127.0.0.1"
    port: int = 0
    #: Offer STARTTLS (roles without implicit TLS); on by default where a certificate is configured.
    starttls: bool = True
    #: A Unix socket instead of address/port (lmtp only; quickstart puts LMTP on DATA_DIR/run/lmtp).
    path: Path | None = None


@dataclass(frozen=True)
class TLS:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Limits:
    """Bounds on every session; defaults follow Postfix's where it has one."""

    max_message_size: int = 50 * 1024 * 1024  # Postfix message_size_limit is 10 MB; issue asks 50 MiB
    max_recipients: int = 1000  # Postfix smtpd_recipient_limit
    max_errors: int = 10  # Postfix smtpd_hard_error_limit (20 on Debian; 10 is stricter)
    max_received_headers: int = 50  # Postfix hopcount_limit
    max_data_line: int = 65536
    idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: server timeout 5 minutes
    session_timeout: float = 1800.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    tls_handshake_timeout: float = 30.0
    #: Seconds a client may take to finish a command line it has started, and the base allowance of
    #: a message transfer (DATA/BDAT, IMAP literals): the slowloris deadline, independent of
    #: idle_timeout (Postfix's smtpd_per_record_deadline, per command rather than per record).
    command_timeout: float = 60.0
    #: Bytes per second a message transfer must sustain on top of command_timeout (Postfix
    #: smtpd_min_data_rate): N bytes may take command_timeout + N / min_data_rate seconds (>= 1).
    min_data_rate: int = 500
    #: Seconds to wait before the SMTP greeting on port 25; a client that talks first is refused
    #: (postscreen's pregreet test). 0 = greet at once (still refusing input that is already there).
    greet_pause: float = 0.0
    #: Storage quota of every user in bytes unless set per domain or user (`postier user quota`);
    #: 0 = none (store/quota.py).
    default_quota: int = 0
    #: Over quota at RCPT/LMTP: false answers 452 4.2.2 (the sender retries, as Dovecot does by
    #: default), true 552 5.2.2 (bounced at once).
    quota_reject_permanent: bool = False


@dataclass(frozen=True)
class DNSSettings:
    #: "ADDR" or "ADDR:PORT" (IPv6 as "[::1]:53"); empty means the system resolver (/etc/resolv.conf).
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0
    #: Reuse answers for their TTL (and negative answers per RFC 2308); false: every lookup goes out.
    cache: bool = True


@dataclass(frozen=True)
class Queue:
    retry_initial: float = 300.0  # Postfix minimal_backoff_time
    retry_max: float = 4000.0  # Postfix maximal_backoff_time
    max_lifetime: float = 5 * 86400.0  # Postfix maximal_queue_lifetime
    delay_warning: float = 0.0  # 0 = off (Postfix delay_warning_time default)
    concurrency_per_domain: int = 20  # Postfix default_destination_concurrency_limit
    concurrency_total: int = 100
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


@dataclass(frozen=True)
class Outbound:
    #: Source address for outgoing connections; empty = the smtp listener's address when specific.
    source_address: str = ""
    #: Name used in EHLO; empty = hostname.
    helo_name: str = ""
    #: Port of remote MX hosts (25; tests and private networks may change it).
    smtp_port: int = 25
    #: STARTTLS towards MX hosts: "opportunistic" (use it when offered, record whether the
    #: certificate verified, never fail on it) or "verify" (a verified certificate is required;
    #: otherwise the attempt is a temporary failure).
    tls_policy: str = "opportunistic"
    #: Extra CA certificates (PEM) trusted for outbound TLS, besides the system store.
    ca_file: Path | None = None
    #: Apply recipient domains' MTA-STS policies (RFC 8461): under "enforce", only listed MX hosts,
    #: over TLS with a verified certificate, else the message waits in the queue.
    mta_sts: bool = True
    #: Port of remote MTA-STS policy hosts (443; tests and private networks may change it).
    https_port: int = 443
    #: DANE (RFC 7672) where the resolver in [dns] vouches for the MX and TLSA records (AD bit):
    #: TLS is then mandatory and the certificate must match a TLSA record.
    dane: bool = True


@dataclass(frozen=True)
class Relay:
    """A smarthost: when host is set, every remote message goes through it (port 587 or 465, AUTH)."""

    host: str = ""
    port: int = 587
    tls: str = "starttls"  # "starttls" | "implicit"
    username: str = ""
    password_file: str = ""


@dataclass(frozen=True)
class Submission:
    #: Who may a user send as: "own" (their address and aliases pointing to them), "domain"
    #: (any address in their own domain), "any".
    sender_policy: str = "own"
    max_messages_per_day: int = 1000


@dataclass(frozen=True)
class Auth:
    #: Failed-login throttling per client IP: delay grows by this much per failure...
    failure_delay: float = 1.0
    #: ...up to this many failures in the window, then the IP is refused (421 / BYE / -ERR).
    max_failures: int = 10
    failure_window: float = 600.0
    #: Allow AUTH/LOGIN without TLS (only sensible on loopback test set-ups).
    allow_plaintext: bool = False
    #: Successful password checks remembered in memory (see accounts.LoginCache); 0 turns it off.
    login_cache_size: int = 10_000
    login_cache_ttl: float = 3600.0
    #: Replace a stored hash made with other argon2 parameters at the next successful login.
    rehash_passwords: bool = True
    #: argon2id's cost for new password hashes (RFC 9106 §4, second recommended option: t=3,
    #: 64 MiB, p=4). Lower them only on a machine that cannot afford 64 MiB per login, knowing that
    #: cheaper hashes are cheaper to crack if the accounts database leaks.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4


@dataclass(frozen=True)
class Mailbox:
    #: Default delivery format for new users: "maildir" or "mbox".
    default_format: str = "maildir"
    recipient_delimiter: str = "+"
    special_use_folders: tuple[str, ...] = ("Sent", "Drafts", "Trash", "Junk", "Archive")
    #: Deliver in a separate agent process (its own GIL: see store/agent.py). false keeps deliveries
    #: in the server process's threads: slower, but what per-process fault injection (libfiu) needs.
    delivery_agent: bool = True


@dataclass(frozen=True)
class IMAP:
    appendlimit: int = 50 * 1024 * 1024
    max_connections_per_user: int = 20  # Dovecot mail_max_userip_connections is 10 per user+IP
    idle_poll_interval: float = 0.5


@dataclass(frozen=True)
class POP3:
    login_delay: int = 0  # 0 = not advertised
    expire: str = "NEVER"


@dataclass(frozen=True)
class MailAuth:
    #: authserv-id of our Authentication-Results headers (RFC 8601 §2.5); empty = hostname.
    authserv_id: str = ""
    spf: bool = True
    dkim_verify: bool = True
    dmarc: bool = True
    dkim_sign: bool = True
    #: ARC (RFC 8617): seal the mail we forward (aliases, Sieve redirect) with the forwarding domain's
    #: RSA DKIM key, and validate the chain of inbound mail (arc= in Authentication-Results).
    arc: bool = True
    dmarc_reports: bool = False
    dnsbl: tuple[str, ...] = ("zen.spamhaus.org", "bl.spamcop.net")
    #: Refuse MAIL FROM at once when SPF says "fail" (otherwise DMARC decides at the end of DATA).
    spf_fail_reject: bool = False
    #: What `postier dns records` tells the admin to publish.
    spf_record: str = "v=spf1 mx ~all"
    dmarc_policy: str = "quarantine"  # "none" | "quarantine" | "reject"
    #: Where aggregate reports for our domains go (rua): a local part (the domain is added) or an address.
    report_address: str = "dmarc-reports"
    #: Messages above this size are not DKIM-verified (memory bound); see pipeline/mailauth.py.
    max_verify_size: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Server:
    """Who the server runs as (see server/privileges.py)."""

    #: Started as root, `serve` binds its listeners, then drops to this user; empty = no switch.
    user: str = ""
    #: Its group; empty = the user's primary group.
    group: str = ""
    #: Allow the server to keep running as root (refused otherwise).
    allow_root: bool = False
    #: Worker processes sharing every listener (server/supervisor.py); 0 (the default) = one per
    #: CPU core this process may use (one core: one process); 1 = one process with no supervisor.
    workers: int = 0


@dataclass(frozen=True)
class DNSListConfig:
    """One DNS blocklist or allowlist (RFC 5782) of [antispam] dnsbl / dnswl."""

    zone: str
    weight: float = 1.0
    #: The return codes that count ("127.0.0.2"); empty: any 127.0.0.0/8 answer but 127.255.255.x.
    codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Antispam:
    """Spam defence at the MX (port 25 only; never submission): see postier/antispam/."""

    #: Connection screening, postscreen-like: lists queried in parallel at connect; a client whose
    #: summed weights reach `threshold` is refused (554 5.7.1) at its first command.
    dnsbl: tuple[DNSListConfig, ...] = ()
    dnswl: tuple[DNSListConfig, ...] = ()
    threshold: float = 3.0
    #: Added to the score of a client that talks before the greeting (see limits.greet_pause).
    pregreet_weight: float = 1.0
    screen_timeout: float = 2.0
    #: Greylisting (off by default): 451 4.7.1 on first sight of (client /24 or /64, sender, recipient).
    greylist: bool = False
    greylist_delay: float = 300.0
    greylist_retry_window: float = 2 * 86400.0
    greylist_auto_allow: int = 5
    greylist_max_entries: int = 200_000
    #: Domains whose DKIM-signed mail skips greylisting: mail whose MAIL FROM is in one of them is
    #: accepted at RCPT and decided at the end of DATA, where a passing signature (d= one of them)
    #: lets it through at once, and anything else is greylisted then (451 after the data).
    greylist_trusted_dkim: tuple[str, ...] = ()
    #: Rspamd's normal worker ("http://127.0.0.1:11333"); empty: no content filtering.
    rspamd: str = ""
    #: Rspamd's controller worker, for learning from users' Junk moves; and its password.
    rspamd_controller: str = ""
    rspamd_password_file: str = ""
    rspamd_timeout: float = 15.0
    #: When Rspamd cannot answer: deliver with "X-Spam-Status: unknown" (true) or 451 (false).
    fail_open: bool = True
    #: Scan authenticated submissions too (a compromised account sending spam is refused).
    scan_outbound: bool = False
    #: Built-in checks that need no Rspamd: the GTUBE test string refuses a message.
    gtube: bool = True
    #: HELO/EHLO sanity (not a FQDN, our own name or address): "off", "log" or "reject" (550 5.7.1).
    helo_checks: str = "log"
    #: Per client address on port 25, per minute; 0 = no limit.
    max_connections_per_minute: int = 0
    max_messages_per_minute: int = 0


@dataclass(frozen=True)
class HTTP:
    """Bounds of the HTTP listeners (roles http and https); deadlines come from [limits]."""

    max_request_line: int = 8190  # the request line (aiohttp's default, as Apache's LimitRequestLine)
    max_field_size: int = 8190  # one header field (Apache LimitRequestFieldSize)
    max_headers: int = 100  # header fields per request (Apache LimitRequestFields)
    max_body: int = 65536  # request bodies (only autodiscover POSTs have one)


@dataclass(frozen=True)
class MTASTS:
    """Our inbound MTA-STS policy (RFC 8461 §3.2), served at https://mta-sts.DOMAIN/."""

    mode: str = "testing"  # "testing" | "enforce" | "none"
    max_age: int = 604800  # seconds (one week); RFC 8461 §3.2 allows up to 31557600


@dataclass(frozen=True)
class TLSRPT:
    """SMTP TLS reporting (RFC 8460): where other servers send reports about their TLS sessions with us."""

    #: The rua of our `_smtp._tls` record: a local part (the domain is added) or an address.
    report_address: str = "tls-reports"
    #: Record the TLS outcome of every outbound session (DATA_DIR/tlsrpt.sqlite), for the reports.
    record: bool = True
    #: Send the daily reports to the recipient domains that ask for them (RFC 8460 §3 rua).
    send_reports: bool = False


@dataclass(frozen=True)
class ACME:
    """Automatic certificates (RFC 8555) for the hostname and each domain's mta-sts/autoconfig names."""

    enabled: bool = False
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    #: Extra CA certificates (PEM) trusted for the ACME server itself (a private CA, Pebble in tests).
    ca_bundle: Path | None = None
    challenge: str = "http-01"  # "http-01" (on the http listener) | "tls-alpn-01" (RFC 8737, on https)
    #: Seconds before the first retry after a failure; doubles up to retry_max.
    retry_initial: float = 300.0
    retry_max: float = 86400.0


@dataclass(frozen=True)
class Sieve:
    """Server-side filtering (RFC 5228) at delivery on port 25 and LMTP, and ManageSieve (RFC 5804)."""

    enabled: bool = True
    max_script_size: int = 256 * 1024
    max_scripts: int = 20
    max_redirects: int = 4
    #: A script run for users without an active one (e.g. spam to Junk through spamtest); none: the
    #: verdict's Junk folder alone. A user's own active script replaces it (it does not run before).
    default_script: Path | None = None
    #: Per domain ([sieve.domain_scripts] "example.org" = "path"): the default script of that domain's
    #: users, in place of `default_script`.
    domain_scripts: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint, GET /metrics on a listener of its own (docs/operations.md "Metrics")."""

    #: "ADDRESS:PORT" ("[::1]:9464" for IPv6); "" (the default): no endpoint.
    listen: str = ""
    #: Client networks that may scrape; anyone else gets 403.
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: A file whose first line is a bearer token every scrape must send (Authorization: Bearer ...);
    #: required when `listen` is not a loopback address.
    token_file: Path | None = None

    def address(self) -> tuple[str, int]:
        """`listen` as (address, port); ValueError when it is not ADDRESS:PORT."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("expected ADDRESS:PORT")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        ipaddress.ip_address(host)
        return host, int(port)


@dataclass(frozen=True)
class Cluster:
    """Cluster mode (docs/scaling.md): mailboxes in PostgreSQL, message bodies in an S3 bucket, so
    that every node serves every user. Off (single-machine mode) while `dsn` is empty."""

    dsn: str = ""  # a libpq connection string or URI
    s3_endpoint: str = ""  # e.g. "https://s3.example.net"
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    #: A file (relative to the data directory) whose first line is the S3 secret key.
    s3_secret_key_file: str = ""
    #: Seconds to wait for a database connection or an object-store answer before failing (4xx/NO).
    timeout: float = 5.0
    #: Seconds a node holds the outbound-queue recipients it claimed without renewing them (it renews
    #: every third of it): after a node dies, its recipients wait this long before another node takes them.
    queue_lease: float = 300.0
    #: Seconds between a node's exchanges of failed-login counts, port 25's rates, IMAP sessions per
    #: user and POP3's last logins with the other nodes (one statement each, server/throttle.py
    #: `ClusterThrottle`, server/limits.py); 0 keeps them per node.
    throttle_interval: float = 1.0


@dataclass(frozen=True)
class Config:
    hostname: str
    data_dir: Path
    listeners: dict[str, Listener] = field(default_factory=dict)
    server: Server = field(default_factory=Server)
    tls: TLS = field(default_factory=TLS)
    limits: Limits = field(default_factory=Limits)
    dns: DNSSettings = field(default_factory=DNSSettings)
    queue: Queue = field(default_factory=Queue)
    outbound: Outbound = field(default_factory=Outbound)
    relay: Relay = field(default_factory=Relay)
    submission: Submission = field(default_factory=Submission)
    auth: Auth = field(default_factory=Auth)
    mailbox: Mailbox = field(default_factory=Mailbox)
    imap: IMAP = field(default_factory=IMAP)
    pop3: POP3 = field(default_factory=POP3)
    mailauth: MailAuth = field(default_factory=MailAuth)
    antispam: Antispam = field(default_factory=Antispam)
    http: HTTP = field(default_factory=HTTP)
    mta_sts: MTASTS = field(default_factory=MTASTS)
    tlsrpt: TLSRPT = field(default_factory=TLSRPT)
    acme: ACME = field(default_factory=ACME)
    sieve: Sieve = field(default_factory=Sieve)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    cluster: Cluster = field(default_factory=Cluster)
    #: Where this configuration was read from (not a TOML key).
    source: Path | None = None

    # Derived locations, all inside data_dir.
    @property
    def accounts_db(self) -> Path:
        return self.data_dir / "accounts.sqlite"

    @property
    def mail_root(self) -> Path:
        return self.data_dir / "mail"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"

    @property
    def authserv_id(self) -> str:
        return self.mailauth.authserv_id or self.hostname

    @property
    def helo_name(self) -> str:
        return self.outbound.helo_name or self.hostname

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context from [tls], or None when no certificate is configured."""
        if self.tls.cert is None or self.tls.key is None:
            return None
        return server_context(self.tls.cert, self.tls.key)  # Mozilla "intermediate" on every listener


_NO_KEY = ("source",)


def _check_address(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value not in ("localhost", "*", ""):
            raise ConfigError(f"{key}: not an IP address: {value!r}") from None


def _convert(key: str, tp: Any, value: object, base: Path) -> object:
    """Check `value` against the annotated type `tp`, converting where TOML has no such type."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a nested table ([listeners.smtp], ...)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return _build(tp, value, base, key + ".")
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(key, args[0], value, base)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        _, vt = typing.get_args(tp)
        return {k: _convert(f"{key}.{k}", vt, v, base) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        (et, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(f"{key}[{i}]", et, v, base) for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base / p)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        if not math.isfinite(value) or value > 1e12:  # TOML allows nan and inf; no timeout wants them
            raise ConfigError(f"{key}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover


def _build[T: DataclassInstance](cls: type[T], table: dict[str, object], base: Path, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in _NO_KEY}
    for k in table:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key")
    kwargs = {k: _convert(prefix + k, hints[k], v, base) for k, v in table.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in table and f.name not in _NO_KEY]
        raise ConfigError(f"{prefix}{missing[0] if missing else '?'}: required key is missing") from exc


def _validate(cfg: Config) -> None:
    try:
        normalize_domain(cfg.hostname)
    except ValueError:
        raise ConfigError(f"hostname: not a valid host name: {cfg.hostname!r}") from None
    if not cfg.listeners:
        raise ConfigError("listeners: at least one listener is required")
    seen: dict[tuple[str, int], str] = {}
    for role, lst in cfg.listeners.items():
        key = f"listeners.{role}"
        if role not in STANDARD_PORTS:
            raise ConfigError(f"{key}: unknown role (known: {', '.join(STANDARD_PORTS)})")
        if lst.path is not None:
            if role != "lmtp":
                raise ConfigError(f"{key}.path: only lmtp listens on a Unix socket")
            if lst.port:
                raise ConfigError(f"{key}.path: give either path or address and port, not both")
            if len(os.fsencode(lst.path)) > 107:  # sockaddr_un.sun_path is 108 bytes with its NUL
                raise ConfigError(f"{key}.path: longer than a Unix socket path may be (107 bytes)")
            continue
        if not 1 <= lst.port <= 65535:
            raise ConfigError(f"{key}.port: must be 1-65535, not {lst.port}")
        _check_address(f"{key}.address", lst.address)
        if (lst.address, lst.port) in seen:
            raise ConfigError(f"{key}.port: {lst.address}:{lst.port} is already used by {seen[(lst.address, lst.port)]}")
        seen[(lst.address, lst.port)] = role
        if role in IMPLICIT_TLS_ROLES and cfg.tls.cert is None:
            raise ConfigError(f"{key}: implicit TLS needs [tls] cert and key")
    if (cfg.tls.cert is None) != (cfg.tls.key is None):
        raise ConfigError("tls: cert and key go together")
    for name in ("cert", "key"):
        p = getattr(cfg.tls, name)
        if p is not None and not os.access(p, os.R_OK):
            raise ConfigError(f"tls.{name}: cannot read {p}")
    if cfg.tls.cert is not None:
        try:
            cfg.ssl_context()
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.cert: unusable certificate or key: {exc}") from None
    for i, ns in enumerate(cfg.dns.nameservers):
        host, _, port = ns.rpartition(":") if ns.count(":") == 1 or ns.startswith("[") else (ns, "", "")
        host = host.strip("[]") or ns
        try:
            ipaddress.ip_address(host)
            if port and not 1 <= int(port) <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigError(f"dns.nameservers[{i}]: expected ADDR or ADDR:PORT, not {ns!r}") from None
    if cfg.mailbox.default_format not in ("maildir", "mbox"):
        raise ConfigError("mailbox.default_format: must be \"maildir\" or \"mbox\"")
    if len(cfg.mailbox.recipient_delimiter) > 1:
        raise ConfigError("mailbox.recipient_delimiter: must be one character or empty")
    if cfg.cluster.dsn and not cfg.cluster.s3_bucket:
        raise ConfigError("cluster.s3_bucket: required in cluster mode (cluster.dsn is set)")
    if cfg.cluster.timeout <= 0:
        raise ConfigError("cluster.timeout: must be positive")
    if cfg.cluster.queue_lease < 1:
        raise ConfigError("cluster.queue_lease: at least 1 second")
    if cfg.cluster.throttle_interval and not 0.1 <= cfg.cluster.throttle_interval <= 60:
        raise ConfigError("cluster.throttle_interval: 0 (per node) or 0.1 to 60 seconds")
    if cfg.submission.sender_policy not in ("own", "domain", "any"):
        raise ConfigError("submission.sender_policy: must be \"own\", \"domain\" or \"any\"")
    if cfg.relay.tls not in ("starttls", "implicit"):
        raise ConfigError("relay.tls: must be \"starttls\" or \"implicit\"")
    if cfg.outbound.tls_policy not in ("opportunistic", "verify"):
        raise ConfigError("outbound.tls_policy: must be \"opportunistic\" or \"verify\"")
    if not 1 <= cfg.outbound.smtp_port <= 65535:
        raise ConfigError(f"outbound.smtp_port: must be 1-65535, not {cfg.outbound.smtp_port}")
    if not 1 <= cfg.outbound.https_port <= 65535:
        raise ConfigError(f"outbound.https_port: must be 1-65535, not {cfg.outbound.https_port}")
    if cfg.outbound.source_address:
        _check_address("outbound.source_address", cfg.outbound.source_address)
    if cfg.mailauth.dmarc_policy not in ("none", "quarantine", "reject"):
        raise ConfigError("mailauth.dmarc_policy: must be \"none\", \"quarantine\" or \"reject\"")
    if not cfg.mailauth.spf_record.startswith("v=spf1"):
        raise ConfigError("mailauth.spf_record: must start with \"v=spf1\"")
    a = cfg.auth
    if not 1 <= a.argon2_time_cost <= 100:
        raise ConfigError(f"auth.argon2_time_cost: must be 1 to 100, not {a.argon2_time_cost}")
    if not 1 <= a.argon2_parallelism <= 64:
        raise ConfigError(f"auth.argon2_parallelism: must be 1 to 64, not {a.argon2_parallelism}")
    if not 8 * a.argon2_parallelism <= a.argon2_memory_kib <= 4 << 20:  # RFC 9106 §3.1: m >= 8p KiB
        raise ConfigError(f"auth.argon2_memory_kib: must be {8 * a.argon2_parallelism} (8 per lane) to "
                          f"{4 << 20} (4 GiB), not {a.argon2_memory_kib}")
    if cfg.limits.max_recipients < 1:
        raise ConfigError("limits.max_recipients: must be at least 1")
    if not 0 <= cfg.server.workers <= 256:
        raise ConfigError(f"server.workers: must be 0 (one per core) to 256, not {cfg.server.workers}")
    if cfg.limits.command_timeout <= 0:
        raise ConfigError("limits.command_timeout: must be positive")
    if cfg.limits.min_data_rate < 1:
        raise ConfigError("limits.min_data_rate: must be at least 1 byte per second")
    if cfg.limits.max_message_size < 1024:
        raise ConfigError("limits.max_message_size: must be at least 1024")
    _validate_antispam(cfg.antispam)
    _validate_metrics(cfg.metrics, seen)
    if cfg.mta_sts.mode not in ("testing", "enforce", "none"):
        raise ConfigError("mta_sts.mode: must be \"testing\", \"enforce\" or \"none\"")
    if not 1 <= cfg.mta_sts.max_age <= 31557600:  # RFC 8461 §3.2
        raise ConfigError("mta_sts.max_age: must be 1-31557600 seconds")
    if cfg.acme.challenge not in ("http-01", "tls-alpn-01"):
        raise ConfigError("acme.challenge: must be \"http-01\" or \"tls-alpn-01\"")
    if cfg.acme.enabled:
        if not cfg.acme.directory.startswith("https://"):
            raise ConfigError("acme.directory: must be an https:// URL (RFC 8555 §6.1)")
        need = "http" if cfg.acme.challenge == "http-01" else "https"
        if need not in cfg.listeners:
            raise ConfigError(f"acme.challenge: {cfg.acme.challenge} needs a [listeners.{need}]")
        if cfg.acme.ca_bundle is not None and not os.access(cfg.acme.ca_bundle, os.R_OK):
            raise ConfigError(f"acme.ca_bundle: cannot read {cfg.acme.ca_bundle}")
    for name in ("max_request_line", "max_field_size", "max_headers", "max_body"):
        if getattr(cfg.http, name) < 1:
            raise ConfigError(f"http.{name}: must be at least 1")
    if cfg.sieve.max_scripts < 1 or cfg.sieve.max_script_size < 1:
        raise ConfigError("sieve.max_scripts: scripts need room (max_scripts and max_script_size at least 1)")
    if not re.fullmatch(r"NEVER|[0-9]{1,5}", cfg.pop3.expire):  # RFC 2449 §6.7
        raise ConfigError("pop3.expire: must be \"NEVER\" or a number of days")
    if not 0 <= cfg.pop3.login_delay < 10**9:  # RFC 2449 §6.5
        raise ConfigError("pop3.login_delay: must be a non-negative number of seconds")


def _validate_metrics(m: MetricsSettings, seen: dict[tuple[str, int], str]) -> None:
    if not m.listen:
        return
    try:
        host, port = m.address()
    except ValueError:
        raise ConfigError(f"metrics.listen: not ADDRESS:PORT with an IP address: {m.listen!r}") from None
    if (host, port) in seen:
        raise ConfigError(f"metrics.listen: {m.listen} is already used by {seen[(host, port)]}")
    for i, net in enumerate(m.allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"metrics.allow[{i}]: not an address or network: {net!r}") from None
    if m.token_file is None and not ipaddress.ip_address(host).is_loopback:
        raise ConfigError("metrics.token_file: required when metrics.listen is not a loopback address")


def _validate_antispam(a: Antispam) -> None:
    for key, lists in (("antispam.dnsbl", a.dnsbl), ("antispam.dnswl", a.dnswl)):
        for i, lst in enumerate(lists):
            try:
                if normalize_domain(lst.zone) != lst.zone.lower().rstrip("."):
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{key}[{i}].zone: not a DNS zone: {lst.zone!r}") from None
            for code in lst.codes:
                try:
                    if ipaddress.ip_address(code) not in ipaddress.ip_network("127.0.0.0/8"):
                        raise ValueError
                except ValueError:
                    raise ConfigError(f"{key}[{i}].codes: {code!r} is not an address in 127.0.0.0/8 "
                                      "(RFC 5782 §2.3)") from None
    for i, dom in enumerate(a.greylist_trusted_dkim):
        try:
            if normalize_domain(dom) != dom.lower().rstrip("."):
                raise ValueError
        except ValueError:
            raise ConfigError(f"antispam.greylist_trusted_dkim[{i}]: not a domain: {dom!r}") from None
    for name in ("threshold", "screen_timeout", "greylist_delay", "greylist_retry_window", "rspamd_timeout"):
        v = getattr(a, name)
        if not v > 0:
            raise ConfigError(f"antispam.{name}: must be positive")
    if a.greylist_retry_window <= a.greylist_delay:
        raise ConfigError("antispam.greylist_retry_window: must be longer than greylist_delay")
    for name in ("greylist_auto_allow", "greylist_max_entries", "max_connections_per_minute",
                 "max_messages_per_minute"):
        if getattr(a, name) < 0:
            raise ConfigError(f"antispam.{name}: must not be negative")
    for name in ("rspamd", "rspamd_controller"):
        url = getattr(a, name)
        if url and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", url):
            raise ConfigError(f"antispam.{name}: not an http:// or https:// URL: {url!r}")
    if a.helo_checks not in ("off", "log", "reject"):
        raise ConfigError('antispam.helo_checks: must be "off", "log" or "reject"')


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, type-check and validate a postier TOML configuration file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {p}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (TOML 1.0 "Spec")
        raise ConfigError(f"config: {p}: not UTF-8 (byte {exc.start})") from None
    cfg = _build(Config, raw, p.resolve().parent)
    cfg = dataclasses.replace(cfg, source=p.resolve())
    _validate(cfg)
    return cfg


def listener_port(role: str, offset: int) -> int:
    """The standard port of `role` plus `offset` (quickstart --port-offset)."""
    return STANDARD_PORTS[role] + offset
