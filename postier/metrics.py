"""The Prometheus metrics of one postier process (text exposition format 0.0.4, via prometheus-client).

Every metric postier exports is declared here, on a registry of its own (not the library's global
one: each `build_app` has its own, so tests and reloads never share counts), made once in the
composition root and handed to the components where the events happen. A component calls one
method per event; this module turns the event into label values from small fixed tables, so the
number of time series stays bounded whatever the clients send: no address, host name, IP address or
free text ever becomes a label (anything unknown is "other").

Scrape-time values (queue size and oldest message, disk space of the data directory) are read when
Prometheus asks, from the sources given to `watch()`. The names and their meaning are listed in
docs/operations.md ("Metrics"); contrib/grafana/postier.json is a dashboard over them.

prometheus-client rather than our own text writer: it is the reference implementation of the format
(escaping, histogram buckets, `_created` samples) and its parser is what the tests read back with.

With `[server] workers` > 1 (server/supervisor.py) each worker counts its own events and /metrics,
served by worker 0, must show the server's totals. For that this uses prometheus-client's own
multiprocess mode (`Metrics(shared_dir=...)`, one per worker process) rather than rows of our own in
the workers' shared table (server/shared.py): every value is a slot in a memory-mapped file per
process in a directory the supervisor makes fresh for each run (DATA_DIR/run/metrics), an event is
one write to that mapping (no lock between processes, no message), and a scrape merges every file:
counters and histograms are summed, including those of workers that died, so a restart never makes a
total go down (which Prometheus would read as a reset); `postier_sessions_active` sums the live
workers only (the supervisor removes a dead worker's gauge file). Writing our own would mean a second
serialiser for every metric type and label set, which the library already keeps. What that mode
cannot do: `_created` samples are not exported, and the `process_*` metrics are those of the
scraping worker alone.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, mmap_dict, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("postier.metrics")

__all__ = ["Metrics", "auth_mechanism", "delivery_outcome", "dns_rdtype", "reply_reason", "role_label",
           "tls_version", "verdict_action"]

#: Listener roles (config.STANDARD_PORTS' keys); anything else is "other".
ROLES = frozenset({"smtp", "submission", "submissions", "lmtp", "imap", "imaps", "pop3", "pop3s",
                   "managesieve", "http", "https"})
STAGES = frozenset({"connect", "mail", "rcpt", "data"})
TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
#: SASL mechanisms (RFC 4422 registry names we may see); "password" is a protocol's own
#: user-and-password command (IMAP LOGIN, POP3 USER/PASS, the webmail's form).
MECHANISMS = frozenset({"PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "CRAM-MD5",
                        "XOAUTH2", "OAUTHBEARER", "EXTERNAL", "ANONYMOUS", "password"})
DNS_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "PTR", "CNAME", "TLSA", "SRV"})  # resolver.SUPPORTED_TYPES
DELIVERY_OUTCOMES = frozenset({"delivered", "deferred", "bounced"})
VERDICT_ACTIONS = {"inbox": "inbox", "accept": "inbox", "junk": "junk", "defer": "defer", "deferred": "defer",
                   "reject": "reject", "refused": "reject"}

#: RFC 3463 §3 enhanced status codes (subject.detail, the class left out) -> reason label. The codes
#: postier's own replies use are named one by one; other codes fall back to their subject (§3.1).
_REASONS = {
    "1.1": "unknown_user",  # bad destination mailbox address
    "1.2": "bad_domain",  # bad destination system address (relaying refused, unknown domain)
    "1.3": "bad_address_syntax",
    "1.7": "bad_sender_syntax",
    "2.1": "mailbox_disabled",
    "2.2": "mailbox_full",
    "3.1": "system_full",
    "3.2": "not_accepting",
    "3.4": "message_too_big",
    "4.0": "mail_loop",
    "4.3": "routing_failure",  # the DNS failed
    "4.7": "expired",
    "5.3": "too_many_recipients",
    "7.0": "security",
    "7.1": "policy",  # not authorised, DNS lists, DMARC/SPF policies, relaying denied
    "7.8": "auth_failed",
    "7.9": "auth_mechanism_weak",
    "7.23": "spf",
    "7.25": "reverse_dns",
    "7.26": "dkim",
    "7.27": "null_mx",
}
_SUBJECTS = {"0": "other", "1": "address", "2": "mailbox", "3": "system", "4": "network", "5": "protocol",
             "6": "content", "7": "policy"}
REASONS = frozenset({*_REASONS.values(), *_SUBJECTS.values(), "local_error", "too_many_connections"})

# Buckets, in seconds: DNS answers (milliseconds to the resolver's timeout); a local delivery (an fsync
# or two); time in the queue until delivery (a second to the 5-day lifetime).
DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOCAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
QUEUE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 2 * 86400.0, 5 * 86400.0)


def role_label(role: str) -> str:
    return role if role in ROLES else "other"


def reply_reason(code: int, enhanced: str) -> str:
    """The reason label of a refusing or deferring SMTP reply, from its enhanced status code (RFC 3463)."""
    if code == 421 and enhanced in ("", "4.7.0"):
        return "too_many_connections"
    _cls, _, rest = enhanced.partition(".")
    if not rest:
        return "local_error" if code in (451, 554) else "other"
    named = _REASONS.get(rest)
    if named is not None:
        return named
    return _SUBJECTS.get(rest.partition(".")[0], "other")


def tls_version(info: str | None) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' (a session's `tls_info`) -> 'TLSv1.3'."""
    version = (info or "").partition(" ")[0]
    return version if version in TLS_VERSIONS else "other"


def auth_mechanism(name: str) -> str:
    if name in ("password", "USER"):  # USER: POP3's USER/PASS (RFC 1939 §7)
        return "password"
    upper = name.upper()
    return upper if upper in MECHANISMS else "other"


def dns_rdtype(rdtype: str) -> str:
    return rdtype if rdtype in DNS_TYPES else "other"


def delivery_outcome(state: str) -> str:
    return state if state in DELIVERY_OUTCOMES else "other"


def verdict_action(action: str) -> str:
    return VERDICT_ACTIONS.get(action, "other")


_M = TypeVar("_M", Counter, Gauge, Histogram)

#: The queue's (message count, creation time of the oldest or None) and the data directory.
QueueSummary = Callable[[], tuple[int, float | None]]


class _Scraped(Collector):
    """Values read at scrape time: the queue and the disk (never stale, nothing to update)."""

    def __init__(self) -> None:
        self.queue: QueueSummary | None = None
        self.data_dir: Path | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None, None, None)

    def collect(self) -> Iterable[Metric]:
        count: int | None = 0
        oldest: float | None = None
        if self.queue is not None:
            try:
                count, oldest = self.queue()
            except Exception as exc:  # the queue's database out of reach (cluster mode): the other
                log.warning("metrics: queue size not read: %s", exc)  # values are still served
                count = None
        free = size = None
        if self.data_dir is not None:
            try:
                st = os.statvfs(self.data_dir)
            except OSError:
                pass
            else:
                free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        age = None if count is None else max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return self._families(count, age, free, size)

    @staticmethod
    def _families(count: int | None, age: float | None, free: int | None, size: int | None) -> Iterator[Metric]:
        for name, doc, value in (
            ("postier_queue_messages", "Messages in the outbound queue.", count),
            ("postier_queue_oldest_message_age_seconds",
             "Age of the oldest message in the outbound queue (0 when it is empty).", age),
            ("postier_data_disk_free_bytes", "Space left for postier in the file system of the data directory.",
             free),
            ("postier_data_disk_size_bytes", "Size of the file system of the data directory.", size),
        ):
            family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], float(value))
            yield family


_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class _ReservedValues(mmap_dict.MmapedDict):
    """prometheus-client's file of one process's values (multiprocess mode), its blocks reserved
    (posix_fallocate) when it is made and before it grows: the library makes it sparse, and a page
    of a sparse file first written when the disk is full kills the process with SIGBUS (workers
    died so on a full disk, `tests/hardening/test_faults.py`). Where no block can be had, the
    values are kept in this process's memory from then on, unseen by /metrics, with a warning: a
    full disk costs metrics, never mail."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            try:
                fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    if os.fstat(fd).st_size == 0:
                        os.posix_fallocate(fd, 0, mmap_dict._INITIAL_MMAP_SIZE)
                finally:
                    os.close(fd)
            except OSError as exc:
                self._in_memory(filename, mmap_dict._INITIAL_MMAP_SIZE, exc)
                return
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _in_memory(self, filename: str, capacity: int, exc: OSError | None) -> None:
        """Go on (or begin) in anonymous memory of `capacity` octets, the values so far copied."""
        if exc is not None:
            log.warning("metrics of this process kept in memory only (not in /metrics): cannot reserve %s: %s",
                        filename, exc)
        old = getattr(self, "_m", None)
        m = mmap.mmap(-1, capacity)
        if old is not None:
            m[:len(old)] = old[:]
            old.close()
            self._f.close()
        else:
            self._positions: dict[str, int] = {}
            self._used = 8
        self._f = io.BytesIO()  # (the library's growth and close() use it; never grown here)
        self._fname, self._m, self._capacity = filename, m, capacity

    def _init_value(self, key: str) -> None:
        need = self._used + len(key.encode()) + 32  # the library's entry: length, key padded to 8, two doubles
        if need > self._capacity:
            capacity = self._capacity
            while need > capacity:
                capacity *= 2
            if isinstance(self._f, io.BytesIO):
                self._in_memory(self._fname, capacity, None)
            else:
                try:
                    os.posix_fallocate(self._f.fileno(), 0, capacity)
                except OSError as exc:
                    self._in_memory(self._fname, capacity, exc)
        super()._init_value(key)  # type: ignore[no-untyped-call]


def _process_id() -> int:
    """This process's id, for prometheus-client's multiprocess mode (it must differ between the
    processes running at once, which the real pid, refreshed after a fork, does)."""
    return _pid


class Metrics:
    """postier's metrics on their own registry; one method per event, labels bounded here."""

    def __init__(self, shared_dir: Path | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self._scraped = _Scraped()
        #: What /metrics renders: this registry, or with `shared_dir` the sums over every worker.
        self.exposed = r
        if shared_dir is not None:  # a worker of several (see the module docstring): for this process
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared_dir)
            # The library asks its process identifier at every event to notice a fork; ours is the
            # pid remembered at start-up and after each fork (no getpid system call per event).
            values.MmapedDict = _ReservedValues  # type: ignore[attr-defined]
            values.ValueClass = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed, str(shared_dir))  # type: ignore[no-untyped-call]
            r = self.exposed  # the process and scrape-time values are read by the scraping worker
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        r.register(self._scraped)
        r = self.registry
        #: Called with "accepted", "refused" or "deferred" for each SMTP outcome counted here
        #: (server/stats.py's last hour for `postier status` is fed from the same events).
        self.outcome_listeners: list[Callable[[str], None]] = []
        #: (metric, label values) -> its child: prometheus-client's labels() takes a lock and checks its
        #: arguments each time (about 3-8 us); the label sets are small, so every child is kept here.
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Gauge | Histogram] = {}
        self.connections = Counter(
            "postier_connections", "Connections accepted by the listeners (refused: over a connection limit).",
            ["role", "result"], registry=r)
        self.sessions = Gauge("postier_sessions_active", "Open client sessions.", ["role"], registry=r,
                              multiprocess_mode="livesum")
        self.tls = Counter("postier_tls_sessions", "TLS sessions set up (implicit TLS or STARTTLS), by version.",
                           ["role", "version"], registry=r)
        self.received = Counter("postier_messages_received",
                                "Messages accepted (250 at the end of DATA; LMTP: one or more recipients).",
                                ["role"], registry=r)
        self.refused = Counter("postier_messages_refused", "Permanent refusals (5xx) at MAIL, RCPT or DATA.",
                               ["role", "stage", "reason"], registry=r)
        self.deferred = Counter("postier_messages_deferred", "Temporary refusals (4xx) at MAIL, RCPT or DATA.",
                                ["role", "stage", "reason"], registry=r)
        self.auth_failures = Counter("postier_auth_failures", "Failed logins.", ["role", "mechanism"], registry=r)
        self.local_deliveries = Counter(
            "postier_local_deliveries", "Mailbox deliveries by the delivery agent, one per user.", ["result"],
            registry=r)
        self.local_seconds = Histogram(
            "postier_local_delivery_duration_seconds", "Time to write one message into its users' mailboxes.",
            registry=r, buckets=LOCAL_BUCKETS)
        self.queue_deliveries = Counter(
            "postier_queue_deliveries", "Delivery attempts of queued mail per recipient, by outcome.",
            ["destination", "outcome"], registry=r)
        self.queue_attempt_seconds = Histogram(
            "postier_queue_attempt_duration_seconds",
            "Time of one delivery attempt of a queued message (routing, connecting, the SMTP transaction).",
            ["destination"], registry=r, buckets=DNS_BUCKETS + (30.0, 60.0, 300.0))
        self.queue_delay = Histogram(
            "postier_queue_delivery_delay_seconds", "Time from queueing to delivery of a recipient.",
            ["destination"], registry=r, buckets=QUEUE_BUCKETS)
        self.dns_seconds = Histogram(
            "postier_dns_query_duration_seconds", "DNS queries sent (answers from the cache are not counted).",
            ["rdtype"], registry=r, buckets=DNS_BUCKETS)
        self.dns_failures = Counter(
            "postier_dns_query_failures", "DNS queries that ended in a temporary or permanent failure.",
            ["rdtype"], registry=r)
        self.verdicts = Counter("postier_spam_verdicts", "Inbound decisions of the port-25 checks.", ["action"],
                                registry=r)
        for role in ("smtp", "submission", "submissions", "lmtp"):  # series exist from the start: rate() works
            self._of(self.received, role)

    def _of(self, metric: _M, *labels: str) -> _M:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]  # labels() returns the metric's own type

    def watch(self, queue: QueueSummary | None = None, data_dir: Path | None = None) -> None:
        """Where the scrape-time values come from."""
        self._scraped.queue = queue
        self._scraped.data_dir = data_dir

    # -- events: one call where each happens ------------------------------------------------------

    def connection(self, role: str, admitted: bool, tls: str | None = None) -> None:
        """A client connected; `tls`: the session's TLS (`tls_info`) when the port is implicit TLS."""
        role = role_label(role)
        self._of(self.connections, role, "accepted" if admitted else "refused").inc()
        if tls is not None:
            self._of(self.tls, role, tls_version(tls)).inc()
        if admitted:
            self._of(self.sessions, role).inc()

    def session_closed(self, role: str) -> None:
        self._of(self.sessions, role_label(role)).dec()

    def tls_started(self, role: str, info: str | None) -> None:
        self._of(self.tls, role_label(role), tls_version(info)).inc()

    def smtp_reply(self, role: str, stage: str, code: int, enhanced: str = "") -> None:
        """The server's answer to MAIL, RCPT or the end of a message (a 2xx at "data" is a message received)."""
        role = role_label(role)
        if code < 400:
            if stage != "data":
                return
            kind = "accepted"
            self._of(self.received, role).inc()
        else:
            stage = stage if stage in STAGES else "other"
            kind = "refused" if code >= 500 else "deferred"
            self._of(self.refused if code >= 500 else self.deferred, role, stage, reply_reason(code, enhanced)).inc()
        for listener in self.outcome_listeners:
            listener(kind)

    def auth_failed(self, role: str, mechanism: str) -> None:
        self._of(self.auth_failures, role_label(role), auth_mechanism(mechanism)).inc()

    def local_delivery(self, delivered: int, failed: int, seconds: float) -> None:
        """One message written for `delivered` users (and not for `failed` ones) in `seconds`."""
        if delivered:
            self._of(self.local_deliveries, "delivered").inc(delivered)
        if failed:
            self._of(self.local_deliveries, "failed").inc(failed)
        self.local_seconds.observe(seconds)

    def queue_outcome(self, local: bool, state: str, delay: float) -> None:
        """One recipient's attempt by the queue: "delivered", "deferred" or "bounced" (`delay`: since queued)."""
        destination = "local" if local else "remote"
        outcome = delivery_outcome(state)
        self._of(self.queue_deliveries, destination, outcome).inc()
        if outcome == "delivered":
            self._of(self.queue_delay, destination).observe(max(0.0, delay))

    def queue_attempt(self, local: bool, seconds: float) -> None:
        """One message's attempt (all its recipients at one destination) took `seconds`."""
        self._of(self.queue_attempt_seconds, "local" if local else "remote").observe(seconds)

    def dns_query(self, rdtype: str, seconds: float, failed: bool) -> None:
        rdtype = dns_rdtype(rdtype)
        self._of(self.dns_seconds, rdtype).observe(seconds)
        if failed:
            self._of(self.dns_failures, rdtype).inc()

    def verdict(self, action: str) -> None:
        self._of(self.verdicts, verdict_action(action)).inc()

    # -- reading ----------------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every sample name the registry exposes now (…_total, …_bucket, …_count, gauges)."""
        return {s.name for family in self.exposed.collect() for s in family.samples}
