"""SMTP TLS reporting (RFC 8460): record outbound TLS outcomes, build daily JSON reports, read others'.

Three parts, as for DMARC reports (`reports.py`, whose bounded decompression, attachment walker,
report mail and mailto parsing this module reuses):
- `TLSReportStore`: one SQLite file (`data_dir/tlsrpt.sqlite`, WAL; in cluster mode the same tables
  in PostgreSQL, `reportdb.py`) with the outcome of each TLS
  session attempt the queue made, aggregated per day, policy and failure detail (so its size is
  bounded by the variety of outcomes, not their number, and capped at MAX_SESSION_ROWS per day),
  the reports we sent and the reports other senders sent about our domains;
- building: `build_reports()` turns the recorded outcomes into one `TLSReport` per policy domain and
  day, `report_json()` writes the §4.4 document, `report_message()` the §5.3 mail with its
  `application/tlsrpt+gzip` attachment (the daily job that sends them through the queue is
  `pipeline/jobs.py` `ReportJob`, the same one that sends DMARC reports);
- reading: `parse_record()` reads a domain's `_smtp._tls` TXT (§3), `extract_tls_reports()` finds
  reports in a received message and `parse_report_json()` reads one; hostile input is expected
  (bounded sizes and counts, every failure one `ReportError`).

The JSON is written and read with the standard library: the §4.4 schema is small and fixed.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postier.mailauth.dmarc import normalize_domain
from postier.mailauth.reportdb import Counted, ReportDB, ReportKind, ReportStorage, SQLiteReportStorage
from postier.mailauth.reports import DAY, ReportError, attachments, decompress, report_mail

__all__ = ["RESULT_TYPES", "STS", "TLSA", "NO_POLICY", "TLSPolicy", "SessionResult", "FailureDetail",
           "PolicyReport", "TLSReport", "TLSReportStore", "ReceivedTLSReport", "SentTLSReport", "parse_record",
           "report_json", "parse_report_json", "extract_tls_reports", "build_reports", "report_message",
           "report_filename", "MEDIA_TYPE"]

#: RFC 8460 §4.4: policy-type values.
STS, TLSA, NO_POLICY = "sts", "tlsa", "no-policy-found"
#: RFC 8460 §4.3: the result types (negotiation, policy, and the DANE and MTA-STS specific ones).
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure",                                                  # §4.3.1
    "tlsa-invalid", "dnssec-invalid", "dane-required",                     # §4.3.2.1
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",  # §4.3.2.2
})
#: RFC 8460 §5.3: the media type of a gzip'd report.
MEDIA_TYPE = "application/tlsrpt+gzip"
_READ_TYPES = (MEDIA_TYPE, "application/tlsrpt+json", "application/gzip", "application/x-gzip",
               "application/json", "application/octet-stream")

MAX_JSON_SIZE = 16 * 1024 * 1024  # decompressed report size we accept
MAX_POLICIES = 1000               # policies per received report we keep
MAX_DETAILS = 1000                # failure details per policy we keep
MAX_STRINGS = 100                 # policy-string / mx-host entries per policy
MAX_SESSION_ROWS = 20_000         # distinct recorded outcomes per day (further new ones are dropped)
MAX_RUA = 5                       # rua destinations used per record
KEEP_DAYS = 14                    # recorded outcomes not reported within this time are dropped


# --- the nouns ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """RFC 8460 §4.4 "policy": what the sender applied to a policy domain."""

    type: str                         # STS | TLSA | NO_POLICY
    domain: str
    strings: tuple[str, ...] = ()     # the STS policy lines, or the TLSA records
    mx_host: tuple[str, ...] = ()     # the STS policy's mx patterns (or the host of a TLSA policy)


@dataclass(frozen=True, slots=True)
class SessionResult:
    """One TLS session attempt (successful when `result` is empty), as the queue records it."""

    policy: TLSPolicy
    result: str = ""        # a RESULT_TYPES value; "" = success
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""        # failure-reason-code: free text


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """RFC 8460 §4.4 "failure-details" entry."""

    result_type: str
    count: int
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PolicyReport:
    policy: TLSPolicy
    successes: int
    failures: tuple[FailureDetail, ...] = ()

    @property
    def failed(self) -> int:
        return sum(f.count for f in self.failures)


@dataclass(frozen=True, slots=True)
class TLSReport:
    """RFC 8460 §4.4: one report (times in seconds since the epoch, UTC)."""

    org_name: str
    contact: str
    report_id: str
    start: int
    end: int
    policies: tuple[PolicyReport, ...] = ()

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.policy.domain for p in self.policies))

    @property
    def successes(self) -> int:
        return sum(p.successes for p in self.policies)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.policies)


# --- the _smtp._tls record (RFC 8460 §3) --------------------------------------------------------------

def parse_record(texts: Iterable[str]) -> tuple[str, ...] | None:
    """The rua URIs of the one `v=TLSRPTv1` record among a name's TXT strings; None when there is no such
    record, several (§3: then the domain does not implement TLSRPT) or no usable rua."""
    recs = [t for t in texts if re.match(r"v=TLSRPTv1\s*(;|$)", t.strip())]
    if len(recs) != 1:
        return None
    rua = ""
    for part in recs[0].split(";")[1:]:
        key, sep, value = part.strip().partition("=")
        if sep and key.strip().lower() == "rua":
            rua = value.strip()
    uris = tuple(u.strip() for u in rua.split(",") if u.strip().lower().startswith(("mailto:", "https:")))
    return uris[:MAX_RUA] or None


# --- JSON (RFC 8460 §4.4) ------------------------------------------------------------------------------

def _rfc3339(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_json(report: TLSReport) -> bytes:
    """The report document (RFC 8460 §4.4; the field names are the RFC's)."""
    doc: dict[str, Any] = {
        "organization-name": report.org_name,
        "date-range": {"start-datetime": _rfc3339(report.start), "end-datetime": _rfc3339(report.end)},
        "contact-info": report.contact,
        "report-id": report.report_id,
        "policies": [],
    }
    for pr in report.policies:
        pol: dict[str, Any] = {"policy-type": pr.policy.type, "policy-domain": pr.policy.domain}
        if pr.policy.type != NO_POLICY:  # §4.4: policy-string and mx-host describe a policy found
            pol["policy-string"] = list(pr.policy.strings)
            if pr.policy.mx_host:
                pol["mx-host"] = list(pr.policy.mx_host)
        entry: dict[str, Any] = {
            "policy": pol,
            "summary": {"total-successful-session-count": pr.successes,
                        "total-failure-session-count": pr.failed},
        }
        details = []
        for f in pr.failures:
            d: dict[str, Any] = {"result-type": f.result_type}
            if f.sending_ip:
                d["sending-mta-ip"] = f.sending_ip
            if f.receiving_mx:
                d["receiving-mx-hostname"] = f.receiving_mx
            if f.receiving_ip:
                d["receiving-ip"] = f.receiving_ip
            d["failed-session-count"] = f.count
            if f.reason:
                d["failure-reason-code"] = f.reason
            details.append(d)
        if details:
            entry["failure-details"] = details
        doc["policies"].append(entry)
    return json.dumps(doc, indent=1, ensure_ascii=True).encode() + b"\n"


def _str(d: Any, key: str, limit: int = 256, default: str = "") -> str:
    v = d.get(key, default) if isinstance(d, dict) else default
    if not isinstance(v, str):
        return default
    return re.sub(r"[^\x20-\x7e]", "?", v.strip())[:limit]


def _count(d: Any, key: str) -> int:
    v = d.get(key, 0) if isinstance(d, dict) else 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return 0
    return min(v, 1 << 53)


def _when(text: str) -> int:
    try:
        return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).timestamp())
    except (ValueError, OverflowError):
        raise ReportError(f"date-range: not an RFC 3339 date-time: {text[:40]!r}") from None


def _strings(d: Any, key: str) -> tuple[str, ...]:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, list):
        return ()
    return tuple(re.sub(r"[^\x20-\x7e]", "?", s)[:512] for s in v[:MAX_STRINGS] if isinstance(s, str))


def parse_report_json(data: bytes) -> TLSReport:
    """Read a report document (RFC 8460 §4.4); raises ReportError for anything that is not one."""
    if len(data) > MAX_JSON_SIZE:
        raise ReportError("report too large")
    try:
        doc = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ReportError(f"invalid JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise ReportError("not a TLS report (not a JSON object)")
    org, report_id = _str(doc, "organization-name"), _str(doc, "report-id")
    dr = doc.get("date-range")
    policies = doc.get("policies")
    if not org or not report_id or not isinstance(dr, dict) or not isinstance(policies, list):
        raise ReportError("not a TLS report: organization-name, report-id, date-range or policies missing")
    start, end = _when(_str(dr, "start-datetime", 64)), _when(_str(dr, "end-datetime", 64))
    out: list[PolicyReport] = []
    for entry in policies[:MAX_POLICIES]:
        pol = entry.get("policy") if isinstance(entry, dict) else None
        domain = normalize_domain(_str(pol, "policy-domain")) if isinstance(pol, dict) else None
        if not domain:
            raise ReportError("a policy without a valid policy-domain")
        policy = TLSPolicy(_str(pol, "policy-type", 32, "?"), domain, _strings(pol, "policy-string"),
                           _strings(pol, "mx-host"))
        summary = entry.get("summary")
        details = entry.get("failure-details")
        failures = tuple(
            FailureDetail(_str(d, "result-type", 64, "?"), _count(d, "failed-session-count"),
                          _str(d, "sending-mta-ip", 64), _str(d, "receiving-mx-hostname"),
                          _str(d, "receiving-ip", 64), _str(d, "failure-reason-code"))
            for d in (details[:MAX_DETAILS] if isinstance(details, list) else ()) if isinstance(d, dict))
        out.append(PolicyReport(policy, _count(summary, "total-successful-session-count"), failures))
    return TLSReport(org, _str(doc, "contact-info"), report_id, start, end, tuple(out))


def extract_tls_reports(message: bytes) -> list[TLSReport]:
    """Every TLS report attached to `message` (RFC 8460 §5.3: application/tlsrpt+gzip or +json).
    Unreadable parts are skipped; ReportError only when there were candidates and none could be read."""
    reports: list[TLSReport] = []
    errors: list[str] = []
    for payload in attachments(message, _READ_TYPES, (".json", ".json.gz", ".gz")):
        try:
            reports.append(parse_report_json(decompress(payload, MAX_JSON_SIZE, plain=b"{")))
        except ReportError as exc:
            errors.append(str(exc))
    if not reports and errors:
        raise ReportError("; ".join(errors)[:500])
    return reports


# --- building and the report mail ---------------------------------------------------------------------

def build_reports(rows: Sequence[tuple[int, SessionResult, int]], *, org_name: str, contact: str, submitter: str,
                  end: int) -> list[TLSReport]:
    """(day, outcome, count) rows -> one report per policy domain and day (RFC 8460 §4.1: daily)."""
    groups: dict[tuple[int, str], dict[TLSPolicy, tuple[int, list[FailureDetail]]]] = {}
    for day, r, n in rows:
        per = groups.setdefault((day, r.policy.domain), {})
        ok, fails = per.get(r.policy, (0, []))
        if r.result:
            fails.append(FailureDetail(r.result, n, r.sending_ip, r.receiving_mx, r.receiving_ip, r.reason))
        else:
            ok += n
        per[r.policy] = (ok, fails)
    out = []
    for (day, domain), per in sorted(groups.items()):
        start = day * DAY
        stop = min(end, start + DAY)
        report_id = f"{secrets.token_hex(6)}.{_rfc3339(start)[:10]}.{domain}@{submitter}"
        policies = tuple(PolicyReport(p, ok, tuple(f)) for p, (ok, f) in
                         sorted(per.items(), key=lambda kv: (kv[0].type, kv[0].strings)))
        out.append(TLSReport(org_name, contact, report_id, start, stop, policies))
    return out


def report_filename(submitter: str, report: TLSReport) -> str:
    """RFC 8460 §5.1: sender "!" policy-domain "!" begin "!" end "!" unique-id ".json.gz"."""
    unique = re.sub(r"[^A-Za-z0-9]", "", report.report_id.partition(".")[0])[:32]
    return f"{submitter}!{report.domains[0]}!{report.start}!{report.end}!{unique}.json.gz"


def report_message(report: TLSReport, submitter: str, from_addr: str, to_addr: str, now: float | None = None
                   ) -> bytes:
    """The report mail (RFC 8460 §5.3): its subject and TLS-Report-* fields, multipart/report with
    report-type tlsrpt, a text part and the gzip'd JSON as application/tlsrpt+gzip."""
    domain = report.domains[0]
    text = (f"TLS report for {domain} from {submitter}: {report.successes} successful and {report.failed} "
            f"failed session(s), {_rfc3339(report.start)} to {_rfc3339(report.end)}.\n")
    return report_mail(
        from_addr, to_addr, submitter,
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report.report_id}>", text,
        gzip.compress(report_json(report), mtime=0), MEDIA_TYPE, report_filename(submitter, report),
        headers=(("TLS-Report-Domain", domain), ("TLS-Report-Submitter", submitter)), report_type="tlsrpt",
        now=now)


# --- the store ----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS session (
    id INTEGER PRIMARY KEY,
    day INTEGER NOT NULL,             -- UTC day number (seconds // 86400)
    domain TEXT NOT NULL,             -- policy domain
    policy TEXT NOT NULL,             -- JSON [type, strings, mx_host]
    result TEXT NOT NULL,             -- '' = success, else an RFC 8460 §4.3 result type
    sending_ip TEXT NOT NULL,
    receiving_mx TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    UNIQUE (day, domain, policy, result, sending_ip, receiving_mx, receiving_ip, reason)
);
CREATE TABLE IF NOT EXISTS report_in (
    id INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    org_name TEXT NOT NULL,
    report_id TEXT NOT NULL,
    start INTEGER NOT NULL,
    document TEXT NOT NULL,           -- the report as report_json() writes it (normalised, bounded)
    authenticated INTEGER NOT NULL,
    UNIQUE (org_name, report_id)
);
CREATE TABLE IF NOT EXISTS report_domain (
    report INTEGER NOT NULL REFERENCES report_in(id) ON DELETE CASCADE,
    domain TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS report_domain_domain ON report_domain(domain);
CREATE TABLE IF NOT EXISTS report_out (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    domain TEXT NOT NULL,
    report_id TEXT NOT NULL,
    rua TEXT NOT NULL,
    successes INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    status TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class ReceivedTLSReport:
    report: TLSReport
    received: float
    authenticated: bool  # the report mail passed DMARC (RFC 8460 §5.3 asks for a DKIM signature)


@dataclass(frozen=True, slots=True)
class SentTLSReport:
    at: float
    domain: str
    report_id: str
    rua: str
    successes: int
    failures: int
    status: str  # queued | not-supported | dns-error ...


def _policy_key(p: TLSPolicy) -> str:
    return json.dumps([p.type, list(p.strings), list(p.mx_host)])


#: the unique key of an outcome's `session` row (`_session_key`)
type SessionKey = tuple[int, str, str, str, str, str, str, str]


def _session_key(r: SessionResult, at: float) -> SessionKey:
    """The unique key of an outcome's `session` row: its day, policy and failure detail (bounded)."""
    return (int(at // DAY), r.policy.domain, _policy_key(r.policy), r.result, r.sending_ip[:64],
            r.receiving_mx[:255], r.receiving_ip[:64], r.reason[:256])


class TLSReportStore(ReportDB[SessionKey]):
    """The TLS report tables: `tlsrpt.sqlite`, or another `ReportStorage` (cluster mode's PostgreSQL,
    where every node counts into the same rows). Thread-safe; every method blocks briefly.

    In SQLite a recorded outcome is committed in WAL mode with synchronous=NORMAL: it survives a
    crash of the process, a power cut may lose the last ones (they are statistics, not mail)."""

    kind = ReportKind("tlsrpt", "session", KEEP_DAYS,
                      ("at", "domain", "report_id", "rua", "successes", "failures", "status"))

    def __init__(self, db: Path | ReportStorage):
        self.path = db if isinstance(db, Path) else None
        super().__init__(SQLiteReportStorage(db, _SCHEMA, "NORMAL") if isinstance(db, Path) else db)

    @property
    def _key(self) -> str:
        """The unique key of `session` (in PostgreSQL the long columns by their digest: store/cluster/reports.py)."""
        if self.storage.dialect == "sqlite":
            return "(day, domain, policy, result, sending_ip, receiving_mx, receiving_ip, reason)"
        return "(day, domain, md5(policy), result, sending_ip, receiving_mx, receiving_ip, md5(reason))"

    # -- outcomes of our own sessions --

    def record(self, r: SessionResult, at: float) -> bool:
        """Count one session outcome; False when the day's bound of distinct outcomes is reached.
        Two processes (or nodes) counting the same outcome at once both count: the row is added to
        in place (`ON CONFLICT DO UPDATE`), never read and written back. Several counting a new
        outcome at once may pass the day's bound by one each."""
        return self._count(_session_key(r, at), 1)

    def _count(self, key: SessionKey, count: int, rows_of: dict[int, int] | None = None) -> bool:
        """`record` (`count` sessions of the outcome `key`); with `rows_of`, the days' numbers of
        rows are taken from it (and kept up to date in it) rather than counted in the table for
        each new outcome (`import_from`)."""
        day = key[0]
        with self._lock:
            if self._add(key, count):
                return True
            if rows_of is None:
                (n,) = self._execute("SELECT COUNT(*) FROM session WHERE day = ?", (day,)).fetchone()
            else:
                n = rows_of.get(day, 0)
            if n >= MAX_SESSION_ROWS:
                return False
            self._insert(key, count)
            if rows_of is not None:
                rows_of[day] = n + 1
            return True

    def _add(self, key: SessionKey, count: int) -> bool:
        """Add `count` to the outcome's row, if there is one."""
        if self.storage.dialect == "sqlite":
            return bool(self._execute(
                "UPDATE session SET count = count + ? WHERE day=? AND domain=? AND policy=? AND result=? AND "
                "sending_ip=? AND receiving_mx=? AND receiving_ip=? AND reason=?", (count, *key)).rowcount)
        day, domain, policy, result, sip, rmx, rip, reason = key
        return bool(self._execute(  # the unique index's expressions, so that it finds the row
            "UPDATE session SET count = count + ? WHERE day=? AND domain=? AND md5(policy)=md5(?) AND result=? "
            "AND sending_ip=? AND receiving_mx=? AND receiving_ip=? AND md5(reason)=md5(?) AND policy=? AND "
            "reason=?", (count, day, domain, policy, result, sip, rmx, rip, reason, policy, reason)).rowcount)

    def _insert(self, key: SessionKey, count: int) -> None:
        """A new outcome's row (added to, should another process have made it meanwhile)."""
        self._execute("INSERT INTO session (day, domain, policy, result, sending_ip, receiving_mx, "
                      f"receiving_ip, reason, count) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT {self._key} "
                      "DO UPDATE SET count = session.count + excluded.count", (*key, count))

    def pending(self, before: float, day: int | None = None,
                domain: str = "") -> list[tuple[int, int, SessionResult, int]]:
        """(row id, day, outcome, count) of every outcome recorded on a day that began before `before`
        (with `day` and `domain`: that day's outcomes of that policy domain only)."""
        where, args = ("", (before,)) if day is None else (" AND day = ? AND domain = ?", (before, day, domain))
        rows = self._rows(
            "SELECT id, day, domain, policy, result, sending_ip, receiving_mx, receiving_ip, reason, count "
            f"FROM session WHERE day * 86400 < ? AND count > 0{where} ORDER BY id", args)
        out = []
        for rid, day, domain, pol, result, sip, rmx, rip, reason, count in rows:
            ptype, strings, mx = json.loads(pol)
            out.append((rid, day, SessionResult(TLSPolicy(ptype, domain, tuple(strings), tuple(mx)), result, sip,
                                                rmx, rip, reason), count))
        return out

    def pending_reports(self, before: float) -> list[tuple[int, str]]:
        """(day, policy domain) of each report due (outcomes of a day that began before `before`),
        in order: the reports a run claims one by one."""
        return [(int(day), str(domain)) for day, domain in self._rows(
            "SELECT DISTINCT day, domain FROM session WHERE day * 86400 < ? AND count > 0 ORDER BY day, domain",
            (before,))]

    def prune(self, before: float) -> int:
        return self._execute("DELETE FROM session WHERE (day + 1) * 86400 < ?", (before,)).rowcount

    # -- `import_from` (reportdb.py): outcomes still counted, by row id and outcome --

    def _importable(self, now: float) -> Iterable[Counted[SessionKey]]:
        """The outcomes still counted (not those of days `prune` would drop: KEEP_DAYS)."""
        for rid, day, r, n in self.pending(float("inf")):
            key = _session_key(r, day * DAY)
            item = f"session/{rid}/{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}"
            yield Counted(item, (day + 1) * DAY < now - KEEP_DAYS * DAY, n, key)

    def _count_imported(self, key: SessionKey, count: int, rows_of: dict[int, int]) -> bool:
        return self._count(key, count, rows_of)

    def _received_all(self) -> list[tuple[TLSReport, bool, float]]:
        return [(rr.report, rr.authenticated, rr.received) for rr in self.received(limit=1 << 62)]

    def log_sent(self, report: TLSReport, rua: str, status: str, at: float) -> None:
        self._execute(
            "INSERT INTO report_out (at, domain, report_id, rua, successes, failures, status) "
            "VALUES (?,?,?,?,?,?,?)", (at, report.domains[0] if report.domains else "", report.report_id, rua,
                                       report.successes, report.failed, status))

    def sent(self) -> list[SentTLSReport]:
        """The log of reports sent (`postier tls reports --sent`), oldest first; a node's entries
        imported into cluster mode among the others by time."""
        rows = self._rows("SELECT at, domain, report_id, rua, successes, failures, status FROM report_out "
                          "ORDER BY at, id")
        return [SentTLSReport(*r) for r in rows]

    # -- reports others sent us --

    def store_received(self, report: TLSReport, authenticated: bool, at: float) -> bool:
        """Keep a report someone sent us; False when we have it already (same organization and report id)."""
        with self._write() as db:
            got = list(db.execute(
                "INSERT INTO report_in (received, org_name, report_id, start, document, authenticated) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (org_name, report_id) DO NOTHING RETURNING id",
                (at, report.org_name, report.report_id, report.start, report_json(report).decode(),
                 int(authenticated))))
            if not got:
                return False
            for d in report.domains:
                db.execute("INSERT INTO report_domain (report, domain) VALUES (?,?)", (got[0][0], d))
            return True

    def received(self, domain: str | None = None, limit: int = 1000) -> list[ReceivedTLSReport]:
        """Reports received (about `domain`, or any), oldest first, at most the `limit` newest."""
        if domain:
            rows = self._rows(
                "SELECT received, document, authenticated FROM report_in WHERE id IN "
                "(SELECT report FROM report_domain WHERE domain = ?) ORDER BY start DESC, id DESC LIMIT ?",
                (domain, limit))
        else:
            rows = self._rows("SELECT received, document, authenticated FROM report_in "
                              "ORDER BY start DESC, id DESC LIMIT ?", (limit,))
        out = []
        for received, document, authed in reversed(rows):
            rep = parse_report_json(document.encode())
            if domain:  # only the policies about that domain
                rep = TLSReport(rep.org_name, rep.contact, rep.report_id, rep.start, rep.end,
                                tuple(p for p in rep.policies if p.policy.domain == domain))
            out.append(ReceivedTLSReport(rep, received, bool(authed)))
        return out
