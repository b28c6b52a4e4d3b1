"""DMARC aggregate reports (RFC 7489 §7.2, Appendix C): record results, send daily reports, read others'.

Three parts:
- `ReportStore`: one SQLite file (`data_dir/dmarc.sqlite`, WAL; in cluster mode the same tables in
  PostgreSQL, `reportdb.py`) with the DMARC results we recorded (identical results of a day counted in
  one row, at most MAX_EVALUATION_ROWS distinct ones a day), the reports we sent and the reports other receivers sent about our domains;
- building and sending: `build_reports()` groups the recorded results per policy domain and rua,
  `report_xml()` writes the Appendix C document, `report_message()` the §7.2.1.1 mail with its
  gzip'd attachment, `external_destination_ok()` the §7.1 check that an external destination agreed
  (the daily job that sends them through the queue is `pipeline/jobs.py` `ReportJob`);
- reading: `extract_reports()` finds gzip, zip or plain XML attachments in a message and
  `parse_report_xml()` reads them. Hostile input is expected: decompression is bounded (a 10 KB
  zip bomb must not become gigabytes), a DOCTYPE (entity expansion, external entities) is refused,
  and every failure is one `ReportError`.

Our own XML writer/reader over the standard library: the schema is small and fixed, and the
Python DMARC report packages we looked at parse without bounds or pull in heavy dependencies.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import logging
import re
import secrets
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from postier.mailauth.dmarc import normalize_domain, psl_organizational_domain
from postier.resolver import AsyncLookup, DNSStatus

from .reportdb import Counted, ReportDB, ReportKind, ReportStorage, SQLiteReportStorage

__all__ = ["ReportError", "DKIMAuth", "SPFAuth", "ReportRow", "PolicyPublished", "AggregateReport",
           "Evaluation", "OutgoingReport", "ReportStore", "report_xml", "parse_report_xml", "decompress",
           "extract_reports", "attachments", "build_reports", "report_message", "report_mail", "report_filename", "parse_rua",
           "external_destination_ok", "DAY", "KEEP_DAYS", "MAX_EVALUATION_ROWS"]

log = logging.getLogger("postier.dmarc")

DAY = 86400
MAX_XML_SIZE = 16 * 1024 * 1024       # decompressed report size we accept
MAX_COMPRESSION_RATIO = 200           # zip members claiming more than this are refused outright
MAX_ZIP_MEMBERS = 8
MAX_ROWS = 20_000                     # records per report we keep
MAX_PARTS = 32                        # MIME parts looked at per message
MAX_REPORT_MESSAGE = 10 * 1024 * 1024 # messages bigger than this are not searched for reports
MAX_RUA = 5                           # rua destinations used per policy
KEEP_DAYS = 14                        # recorded results are kept this long (then dropped, sent or not)
MAX_EVALUATION_ROWS = 20_000          # distinct recorded results per day (further new ones are dropped)


class ReportError(Exception):
    """A report could not be read (bad compression, too big, not a DMARC aggregate report)."""


@dataclass(frozen=True, slots=True)
class DKIMAuth:
    domain: str
    selector: str
    result: str


@dataclass(frozen=True, slots=True)
class SPFAuth:
    domain: str
    scope: str  # "mfrom" | "helo"
    result: str


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One <record>: messages sharing these values (Appendix C RowType, IdentifierType, AuthResultType)."""

    source_ip: str
    count: int
    disposition: str  # none | quarantine | reject
    dkim: str         # aligned DKIM: pass | fail
    spf: str          # aligned SPF: pass | fail
    header_from: str
    reasons: tuple[str, ...] = ()
    dkim_auth: tuple[DKIMAuth, ...] = ()
    spf_auth: tuple[SPFAuth, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyPublished:
    domain: str
    p: str
    sp: str = ""
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    fo: str = "0"


@dataclass(frozen=True, slots=True)
class AggregateReport:
    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    policy: PolicyPublished
    rows: tuple[ReportRow, ...] = ()

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.rows)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One message's DMARC outcome, as recorded at the end of DATA; read back from the store, `count`
    identical outcomes of a day (`at` the first one's time)."""

    at: float
    source_ip: str
    header_from: str
    envelope_from: str
    policy: PolicyPublished
    rua: tuple[str, ...]
    disposition: str
    dkim_aligned: bool
    spf_aligned: bool
    dkim_auth: tuple[DKIMAuth, ...] = ()
    spf_auth: tuple[SPFAuth, ...] = ()
    reasons: tuple[str, ...] = ()
    count: int = 1


# --- XML (RFC 7489 Appendix C) ----------------------------------------------------------------------

def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def report_xml(report: AggregateReport) -> bytes:
    """The aggregate report document (RFC 7489 Appendix C schema)."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", report.org_name)
    _sub(meta, "email", report.email)
    _sub(meta, "report_id", report.report_id)
    dr = _sub(meta, "date_range")
    _sub(dr, "begin", report.begin)
    _sub(dr, "end", report.end)
    pp = _sub(root, "policy_published")
    pol = report.policy
    _sub(pp, "domain", pol.domain)
    _sub(pp, "adkim", pol.adkim)
    _sub(pp, "aspf", pol.aspf)
    _sub(pp, "p", pol.p)
    _sub(pp, "sp", pol.sp or pol.p)
    _sub(pp, "pct", pol.pct)
    _sub(pp, "fo", pol.fo)
    for row in report.rows:
        rec = _sub(root, "record")
        r = _sub(rec, "row")
        _sub(r, "source_ip", row.source_ip)
        _sub(r, "count", row.count)
        pe = _sub(r, "policy_evaluated")
        _sub(pe, "disposition", row.disposition)
        _sub(pe, "dkim", row.dkim)
        _sub(pe, "spf", row.spf)
        for reason in row.reasons:
            rs = _sub(pe, "reason")
            _sub(rs, "type", reason)
        ids = _sub(rec, "identifiers")
        _sub(ids, "header_from", row.header_from)
        auth = _sub(rec, "auth_results")
        for d in row.dkim_auth:
            de = _sub(auth, "dkim")
            _sub(de, "domain", d.domain)
            if d.selector:
                _sub(de, "selector", d.selector)
            _sub(de, "result", d.result)
        for s in row.spf_auth or (SPFAuth(row.header_from, "mfrom", "none"),):  # at least one <spf>
            se = _sub(auth, "spf")
            _sub(se, "domain", s.domain)
            _sub(se, "scope", s.scope)
            _sub(se, "result", s.result)
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body + b"\n"


_DTD = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)


def _text(el: ET.Element | None, path: str, default: str = "", limit: int = 256) -> str:
    found = el.find(path) if el is not None else None
    if found is None or found.text is None:
        return default
    return re.sub(r"[^\x20-\x7e]", "?", found.text.strip())[:limit]


def _int(el: ET.Element | None, path: str, default: int = 0) -> int:
    value = _text(el, path)
    return int(value) if value.isdigit() and len(value) < 16 else default


def parse_report_xml(data: bytes) -> AggregateReport:
    """Read an aggregate report document; raises ReportError."""
    if len(data) > MAX_XML_SIZE:
        raise ReportError("report too large")
    data = data.removeprefix(b"\xef\xbb\xbf")
    if b"\x00" in data:
        raise ReportError("not a UTF-8 XML document")
    if _DTD.search(data):
        raise ReportError("DOCTYPE or ENTITY declarations are not accepted")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: an unknown encoding="..."
        raise ReportError(f"invalid XML: {exc}") from None
    for el in root.iter():  # RFC 7489 documents have no namespace; its successor's do
        if isinstance(el.tag, str):
            el.tag = el.tag.rpartition("}")[2]
    if root.tag != "feedback":
        raise ReportError(f"not a DMARC aggregate report (root element {root.tag!r})")
    meta = root.find("report_metadata")
    pp = root.find("policy_published")
    if meta is None or pp is None:
        raise ReportError("report_metadata or policy_published missing")
    domain = normalize_domain(_text(pp, "domain")) or ""
    if not domain:
        raise ReportError("policy_published/domain missing or invalid")
    policy = PolicyPublished(domain, _text(pp, "p", "none", 16), _text(pp, "sp", "", 16),
                             _text(pp, "adkim", "r", 2), _text(pp, "aspf", "r", 2), _int(pp, "pct", 100),
                             _text(pp, "fo", "0", 16))
    rows: list[ReportRow] = []
    for rec in root.iterfind("record"):
        if len(rows) >= MAX_ROWS:
            break
        row = rec.find("row")
        pe = row.find("policy_evaluated") if row is not None else None
        auth = rec.find("auth_results")
        dkim_auth = tuple(DKIMAuth(_text(d, "domain"), _text(d, "selector"), _text(d, "result"))
                          for d in (auth.iterfind("dkim") if auth is not None else ()))[:20]
        spf_auth = tuple(SPFAuth(_text(s, "domain"), _text(s, "scope", "mfrom"), _text(s, "result"))
                         for s in (auth.iterfind("spf") if auth is not None else ()))[:20]
        reasons = tuple(_text(r, "type") for r in (pe.iterfind("reason") if pe is not None else ()))[:10]
        rows.append(ReportRow(
            source_ip=_text(row, "source_ip", "?", 64), count=_int(row, "count", 0),
            disposition=_text(pe, "disposition", "none", 16), dkim=_text(pe, "dkim", "fail", 16),
            spf=_text(pe, "spf", "fail", 16), header_from=_text(rec, "identifiers/header_from"),
            reasons=reasons, dkim_auth=dkim_auth, spf_auth=spf_auth))
    return AggregateReport(_text(meta, "org_name", "?"), _text(meta, "email"), _text(meta, "report_id", "?"),
                           _int(meta, "date_range/begin"), _int(meta, "date_range/end"), policy, tuple(rows))


# --- decompression, bounded -------------------------------------------------------------------------

def _gunzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
    out = bytearray()
    chunk = data
    try:
        while chunk and not d.eof:
            out += d.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                raise ReportError(f"report bigger than {limit} bytes once decompressed")
            chunk = d.unconsumed_tail
    except zlib.error as exc:
        raise ReportError(f"bad gzip data: {exc}") from None
    if not d.eof:
        raise ReportError("truncated gzip data")
    return bytes(out)


def _unzip(data: bytes, limit: int) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()][:MAX_ZIP_MEMBERS]
            xml_members = [m for m in members if m.filename.lower().endswith(".xml")] or members
            if not xml_members:
                raise ReportError("empty zip archive")
            member = xml_members[0]
            if member.file_size > limit or (member.compress_size and
                                            member.file_size > MAX_COMPRESSION_RATIO * member.compress_size
                                            and member.file_size > 1024 * 1024):
                raise ReportError(f"zip member {member.filename!r} too large")
            with zf.open(member) as f:  # the sizes in the directory may lie: read with a bound
                out = f.read(limit + 1)
            if len(out) > limit:
                raise ReportError(f"report bigger than {limit} bytes once decompressed")
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error,
            RuntimeError, OSError, ValueError) as exc:
        raise ReportError(f"bad zip data: {exc.__class__.__name__}: {exc}") from None


def decompress(data: bytes, limit: int = MAX_XML_SIZE, plain: bytes = b"<") -> bytes:
    """gzip, zip or a plain document (by content, not by name: `plain` is its first byte, "<" for XML,
    "{" for JSON) -> the document's bytes, at most `limit` of them."""
    if data[:2] == b"\x1f\x8b":
        return _gunzip(data, limit)
    if data[:4] == b"PK\x03\x04":
        return _unzip(data, limit)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == plain:
        if len(data) > limit:
            raise ReportError("report too large")
        return data
    raise ReportError("neither gzip, zip nor " + ("XML" if plain == b"<" else "JSON"))


_REPORT_TYPES = ("application/gzip", "application/x-gzip", "application/zip", "application/x-zip-compressed",
                 "application/x-zip", "application/xml", "text/xml", "application/octet-stream")


def attachments(message: bytes, types: Sequence[str], suffixes: tuple[str, ...]) -> list[bytes]:
    """The decoded payloads of `message`'s parts that look like reports (by media type or file name
    suffix), at most MAX_PARTS parts looked at. Shared by DMARC and TLS-RPT (RFC 8460 §5.3) readers."""
    if len(message) > MAX_REPORT_MESSAGE:
        raise ReportError("message too large to hold a report")
    try:
        msg = BytesParser(policy=email_policy.compat32).parsebytes(message)
    except Exception as exc:  # the stdlib parser is lenient; be safe anyway
        raise ReportError(f"unparsable message: {exc.__class__.__name__}") from None
    out: list[bytes] = []
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type().lower()
        name = (part.get_filename() or "").lower()
        if ctype not in types and not name.endswith(suffixes):
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            payload = None
        if isinstance(payload, bytes) and payload:
            out.append(payload)
    return out


def extract_reports(message: bytes) -> list[AggregateReport]:
    """Every aggregate report attached to `message` (or forming its body). Unreadable parts are skipped;
    ReportError only when the message had candidates and none could be read."""
    reports: list[AggregateReport] = []
    errors: list[str] = []
    for payload in attachments(message, _REPORT_TYPES, (".xml", ".gz", ".zip")):
        try:
            reports.append(parse_report_xml(decompress(payload)))
        except ReportError as exc:
            errors.append(str(exc))
    if not reports and errors:
        raise ReportError("; ".join(errors)[:500])
    return reports


# --- rua and the external destination check ---------------------------------------------------------

_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rua(uris: Iterable[str]) -> list[tuple[str, int | None]]:
    """mailto: URIs of a rua tag -> (address, size limit or None) (RFC 7489 §6.2, §6.3)."""
    out: list[tuple[str, int | None]] = []
    for uri in uris:
        scheme, _, rest = uri.partition(":")
        if scheme.lower() != "mailto" or not rest:
            continue  # only mailto is defined for aggregate reports here
        target, _, size = rest.partition("!")
        address = unquote(target.split("?", 1)[0]).strip()
        local, at, domain = address.rpartition("@")
        ndomain = normalize_domain(domain) if at and local else None
        if ndomain is None or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}", local):
            continue
        limit = None
        m = _SIZE.match(size)
        if m:
            limit = int(m.group(1)) * _UNITS[m.group(2).lower()]
        out.append((f"{local}@{ndomain}", limit))
        if len(out) >= MAX_RUA:
            break
    return out


async def external_destination_ok(policy_domain: str, rua_domain: str, resolver: AsyncLookup) -> bool | None:
    """RFC 7489 §7.1: may reports about `policy_domain` go to `rua_domain`? None = DNS trouble, ask later."""
    if psl_organizational_domain(policy_domain) == psl_organizational_domain(rua_domain):
        return True
    answer = await resolver.query(f"{policy_domain}._report._dmarc.{rua_domain}", "TXT")
    if answer.status is DNSStatus.TEMPFAIL:
        return None
    # §7.1 step 3-4: at least one record starting with "v=DMARC1"
    return any(bytes(r).lstrip().startswith(b"v=DMARC1") for r in answer.records)


# --- the store --------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluation (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    source_ip TEXT NOT NULL,
    header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL,
    policy TEXT NOT NULL,        -- JSON PolicyPublished
    policy_domain TEXT NOT NULL,
    rua TEXT NOT NULL,           -- JSON list of URIs
    disposition TEXT NOT NULL,
    dkim TEXT NOT NULL,
    spf TEXT NOT NULL,
    auth TEXT NOT NULL,          -- JSON {"dkim": [...], "spf": [...], "reasons": [...]}
    reported INTEGER NOT NULL DEFAULT 0,  -- 1: sent (rows of one message each, recorded before counting)
    day INTEGER,                 -- UTC day number of `at`; NULL on rows recorded before counting
    digest TEXT,                 -- _digest(): the counted fields; NULL on rows recorded before counting
    count INTEGER NOT NULL DEFAULT 1  -- identical results of the day (`at` is the first one's time)
);
CREATE INDEX IF NOT EXISTS evaluation_pending ON evaluation(reported, at);
CREATE TABLE IF NOT EXISTS report_in (
    id INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    org_name TEXT NOT NULL,
    email TEXT NOT NULL,
    report_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    begin INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    policy TEXT NOT NULL,
    authenticated INTEGER NOT NULL,
    UNIQUE (org_name, report_id)
);
CREATE TABLE IF NOT EXISTS report_row (
    report INTEGER NOT NULL REFERENCES report_in(id) ON DELETE CASCADE,
    source_ip TEXT NOT NULL,
    count INTEGER NOT NULL,
    disposition TEXT NOT NULL,
    dkim TEXT NOT NULL,
    spf TEXT NOT NULL,
    header_from TEXT NOT NULL,
    auth TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS report_row_report ON report_row(report);
CREATE TABLE IF NOT EXISTS report_out (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    domain TEXT NOT NULL,
    report_id TEXT NOT NULL,
    begin INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    rua TEXT NOT NULL,
    messages INTEGER NOT NULL,
    status TEXT NOT NULL
);
"""


def _policy_json(p: PolicyPublished) -> str:
    return json.dumps([p.domain, p.p, p.sp, p.adkim, p.aspf, p.pct, p.fo])


def _policy_from(text: str) -> PolicyPublished:
    d, p, sp, adkim, aspf, pct, fo = json.loads(text)
    return PolicyPublished(d, p, sp, adkim, aspf, int(pct), fo)


def _auth_json(dkim: Sequence[DKIMAuth], spf: Sequence[SPFAuth], reasons: Sequence[str]) -> str:
    return json.dumps({"dkim": [[d.domain, d.selector, d.result] for d in dkim],
                       "spf": [[s.domain, s.scope, s.result] for s in spf], "reasons": list(reasons)})


def _auth_from(text: str) -> tuple[tuple[DKIMAuth, ...], tuple[SPFAuth, ...], tuple[str, ...]]:
    data = json.loads(text)
    return (tuple(DKIMAuth(*d) for d in data.get("dkim", [])), tuple(SPFAuth(*s) for s in data.get("spf", [])),
            tuple(data.get("reasons", [])))


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    report: AggregateReport
    received: float
    authenticated: bool


def _digest(columns: Sequence[str]) -> str:
    """The key of a result's counted row within its day: every field a report's <record> is made
    of (the policy, rua, source IP, header_from, disposition, aligned results, auth results and
    reasons), from `_columns`; not the time, nor the envelope sender, which no report carries: a
    sender with a new bounce address per message (lists, bulk mail) would otherwise make a row per
    message and fill the day's bound. The row keeps the first such message's envelope sender."""
    source_ip, header_from, _envelope_from, *rest = columns
    return hashlib.sha256(json.dumps([source_ip, header_from, *rest]).encode()).hexdigest()[:32]


def _columns(ev: Evaluation) -> tuple[str, ...]:
    """(source_ip, header_from, envelope_from, policy, policy_domain, rua, disposition, dkim, spf, auth)."""
    return (ev.source_ip, ev.header_from, ev.envelope_from, _policy_json(ev.policy), ev.policy.domain,
            json.dumps(list(ev.rua)), ev.disposition, "pass" if ev.dkim_aligned else "fail",
            "pass" if ev.spf_aligned else "fail", _auth_json(ev.dkim_auth, ev.spf_auth, ev.reasons))


class ReportStore(ReportDB[Evaluation]):
    """The DMARC report tables: `dmarc.sqlite`, or another `ReportStorage` (cluster mode's
    PostgreSQL, where every node records into the same tables). Thread-safe; every method blocks
    briefly.

    Identical results of a day (every field `build_reports` puts in a <record>: `_digest`) are
    counted in one `evaluation` row, added to in place (`INSERT ... ON CONFLICT DO
    UPDATE`, as the TLS store counts its outcomes): two processes or nodes recording at once lose
    nothing. A day holds at most MAX_EVALUATION_ROWS distinct results: past it, a result like one
    already counted that day is still counted, a new one is dropped (`record` returns False; the
    delivery goes on) and the first drop of the day is logged (once per process). Reports built from
    what was kept are exact for it. Rows written before counting (one message each: `day` and
    `digest` NULL, `count` 1) are read and reported as before."""

    kind = ReportKind("dmarc", "evaluation", KEEP_DAYS,
                      ("at", "domain", "report_id", "begin", '"end"', "rua", "messages", "status"))

    def __init__(self, db: Path | ReportStorage):
        self.path = db if isinstance(db, Path) else None
        super().__init__(SQLiteReportStorage(db, _SCHEMA) if isinstance(db, Path) else db)
        self._full_day = -1  # the last day a new result was dropped (logged once)
        if self.storage.dialect == "sqlite":
            self._upgrade()  # PostgreSQL's tables are upgraded where they are made (store/cluster/reports.py)

    def _upgrade(self) -> None:
        """Add the counting columns to a file written before them (its rows stay, one message each)."""
        with self._write() as db:
            have = {str(r[1]) for r in db.execute("PRAGMA table_info(evaluation)")}
            for column, decl in (("day", "INTEGER"), ("digest", "TEXT"), ("count", "INTEGER NOT NULL DEFAULT 1")):
                if column not in have:
                    db.execute(f"ALTER TABLE evaluation ADD COLUMN {column} {decl}")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS evaluation_key ON evaluation(day, digest)")

    def record(self, ev: Evaluation) -> bool:
        """Count `ev` (`ev.count` messages) in its day's row; False when it is a new result and the
        day holds MAX_EVALUATION_ROWS distinct ones already (dropped, logged once a day). Several
        recording a new result at once may pass the day's bound by one each."""
        return self._count(ev)

    def _count(self, ev: Evaluation, rows_of: dict[int, int] | None = None) -> bool:
        """`record`; with `rows_of`, the days' numbers of rows are taken from it (and kept up to
        date in it) rather than counted in the table for each new result (`import_from`)."""
        columns = _columns(ev)
        day, digest = int(ev.at // DAY), _digest(columns)
        with self._lock:
            if self._add(day, digest, ev.count, ev.at):
                return True
            if rows_of is None:
                (n,) = self._execute("SELECT COUNT(*) FROM evaluation WHERE day = ?", (day,)).fetchone()
            else:
                n = rows_of.get(day, 0)
            if n >= MAX_EVALUATION_ROWS:
                if self._full_day != day:
                    self._full_day = day
                    log.warning("dmarc: %d distinct results recorded for day %s: new ones are not kept for "
                                "the reports of that day (identical ones are still counted)", n, _day(day * DAY))
                return False
            least = "min" if self.storage.dialect == "sqlite" else "LEAST"
            self._execute(  # added to, should another process have made the row meanwhile
                "INSERT INTO evaluation (at, source_ip, header_from, envelope_from, policy, policy_domain, rua, "
                "disposition, dkim, spf, auth, day, digest, count) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (day, digest) DO UPDATE SET count = evaluation.count + excluded.count, "
                f"at = {least}(evaluation.at, excluded.at)", (ev.at, *columns, day, digest, ev.count))
            if rows_of is not None:
                rows_of[day] = n + 1
            return True

    def _add(self, day: int, digest: str, count: int, at: float) -> bool:
        """Add `count` to the day's row of the result `digest`, if there is one."""
        least = "min" if self.storage.dialect == "sqlite" else "LEAST"
        return bool(self._execute(f"UPDATE evaluation SET count = count + ?, at = {least}(at, ?) "
                                  "WHERE day = ? AND digest = ?", (count, at, day, digest)).rowcount)

    def pending(self, before: float, domain: str | None = None) -> list[tuple[int, Evaluation]]:
        """(row id, result) of the results not reported yet, recorded before `before` (about the
        policy domain `domain`, or any); each result's `count` is its row's."""
        where, args = ("", (before,)) if domain is None else (" AND policy_domain = ?", (before, domain))
        rows = self._rows(
            "SELECT id, at, source_ip, header_from, envelope_from, policy, rua, disposition, dkim, spf, auth, count "
            f"FROM evaluation WHERE reported = 0 AND count > 0 AND at < ?{where} ORDER BY id", args)
        out = []
        for rid, at, ip, hfrom, efrom, pol, rua, disp, dkim, spf, auth, count in rows:
            d, s, reasons = _auth_from(auth)
            out.append((rid, Evaluation(at, ip, hfrom, efrom, _policy_from(pol), tuple(json.loads(rua)), disp,
                                        dkim == "pass", spf == "pass", d, s, reasons, int(count))))
        return out

    def pending_domains(self, before: float) -> list[str]:
        """The policy domains with results to report (not reported yet, recorded before `before`,
        with a rua), in order: the reports a run claims one by one."""
        return [str(d) for (d,) in self._rows(
            "SELECT DISTINCT policy_domain FROM evaluation WHERE reported = 0 AND count > 0 AND at < ? "
            "AND rua <> '[]' ORDER BY policy_domain", (before,))]

    def log_sent(self, out: OutgoingReport, rua: str, status: str, at: float) -> None:
        self._execute(
            'INSERT INTO report_out (at, domain, report_id, begin, "end", rua, messages, status) '
            "VALUES (?,?,?,?,?,?,?,?)", (at, out.report.policy.domain, out.report.report_id, out.report.begin,
                                         out.report.end, rua, out.report.messages, status))

    def sent(self) -> list[tuple[float, str, str, str, int, str]]:
        """The log of reports sent (`postier dmarc sent`), oldest first: (when, policy domain, report
        id, rua, messages, status); a node's entries imported into cluster mode among the others by time."""
        return [(float(at), domain, report_id, rua, int(n), status) for at, domain, report_id, rua, n, status in
                self._rows("SELECT at, domain, report_id, rua, messages, status FROM report_out ORDER BY at, id")]

    def prune(self, before: float) -> int:
        return self._execute("DELETE FROM evaluation WHERE at < ?", (before,)).rowcount

    def store_received(self, report: AggregateReport, authenticated: bool, at: float) -> bool:
        """Keep a report someone sent us; False when we have it already (same org and report id)."""
        with self._write() as db:
            got = list(db.execute(
                'INSERT INTO report_in (received, org_name, email, report_id, domain, begin, "end", policy, '
                "authenticated) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (org_name, report_id) DO NOTHING RETURNING id",
                (at, report.org_name, report.email, report.report_id, report.policy.domain, report.begin,
                 report.end, _policy_json(report.policy), int(authenticated))))
            if not got:
                return False
            for r in report.rows:
                db.execute(
                    "INSERT INTO report_row (report, source_ip, count, disposition, dkim, spf, header_from, auth) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (got[0][0], r.source_ip, r.count, r.disposition, r.dkim, r.spf, r.header_from,
                     _auth_json(r.dkim_auth, r.spf_auth, r.reasons)))
            return True

    # -- `import_from` (reportdb.py): results not reported yet, by row id and digest --

    def _importable(self, now: float) -> Iterable[Counted[Evaluation]]:
        """The results not reported yet (not those older than KEEP_DAYS: the next run would drop
        them), each noted by its row id and digest."""
        for rid, ev in self.pending(float("inf")):
            yield Counted(f"evaluation/{rid}/{_digest(_columns(ev))}", ev.at < now - KEEP_DAYS * DAY, ev.count, ev)

    def _count_imported(self, key: Evaluation, count: int, rows_of: dict[int, int]) -> bool:
        return self._count(dataclasses.replace(key, count=count), rows_of)

    def _received_all(self) -> list[tuple[AggregateReport, bool, float]]:
        return [(rr.report, rr.authenticated, rr.received) for rr in self.received()]

    def received(self, domain: str | None = None) -> list[ReceivedReport]:
        q = 'SELECT id, received, org_name, email, report_id, begin, "end", policy, authenticated FROM report_in'
        args: tuple[Any, ...] = ()
        if domain:
            q += " WHERE domain = ?"
            args = (domain,)
        out = []
        with self._lock:
            reports = self._rows(q + " ORDER BY begin, id", args)
            for rid, received, org, email, report_id, begin, end, pol, authed in reports:
                rows = self._rows(
                    "SELECT source_ip, count, disposition, dkim, spf, header_from, auth FROM report_row "
                    f"WHERE report = ? ORDER BY {self.rowid}", (rid,))
                rrows = []
                for ip, count, disp, dkim, spf, hfrom, auth in rows:
                    d, s, reasons = _auth_from(auth)
                    rrows.append(ReportRow(ip, count, disp, dkim, spf, hfrom, reasons, d, s))
                out.append(ReceivedReport(AggregateReport(org, email, report_id, begin, end, _policy_from(pol),
                                                          tuple(rrows)), received, bool(authed)))
        return out


# --- building and sending ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OutgoingReport:
    report: AggregateReport
    rua: tuple[str, ...]          # the rua URIs of the policy
    taken: tuple[tuple[int, int], ...]  # (row id, count) of the results covered: `ReportStore.mark_reported`
    submitter: str

    @property
    def filename(self) -> str:
        return report_filename(self.submitter, self.report)

    def gzipped(self) -> bytes:
        return gzip.compress(report_xml(self.report), mtime=0)


def report_filename(submitter: str, report: AggregateReport) -> str:
    """RFC 7489 §7.2.1.1: receiver "!" policy-domain "!" begin "!" end [ "!" unique-id ] ".xml.gz"."""
    return f"{submitter}!{report.policy.domain}!{report.begin}!{report.end}.xml.gz"


def build_reports(pending: Sequence[tuple[int, Evaluation]], *, org_name: str, email: str, submitter: str,
                  end: int) -> list[OutgoingReport]:
    """Group recorded results by (policy, rua) and aggregate identical rows (RFC 7489 §7.2), adding
    up their counts (a stored result is `count` identical messages)."""
    groups: dict[tuple[PolicyPublished, tuple[str, ...]], list[tuple[int, Evaluation]]] = {}
    for rid, ev in pending:
        if ev.rua:
            groups.setdefault((ev.policy, ev.rua), []).append((rid, ev))
    out = []
    for (policy, rua), items in sorted(groups.items(), key=lambda kv: kv[0][0].domain):
        counts: dict[tuple[Any, ...], int] = {}
        for _, ev in items:
            key = (ev.source_ip, ev.disposition, "pass" if ev.dkim_aligned else "fail",
                   "pass" if ev.spf_aligned else "fail", ev.header_from, ev.reasons, ev.dkim_auth, ev.spf_auth)
            counts[key] = counts.get(key, 0) + ev.count
        rows = tuple(ReportRow(ip, n, disp, dkim, spf, hfrom, reasons, dauth, sauth)
                     for (ip, disp, dkim, spf, hfrom, reasons, dauth, sauth), n in counts.items())
        begin = int(min(ev.at for _, ev in items))
        report_id = f"{begin}.{policy.domain}.{secrets.token_hex(6)}"
        out.append(OutgoingReport(AggregateReport(org_name, email, report_id, begin, end, policy, rows[:MAX_ROWS]),
                                  rua, tuple((rid, ev.count) for rid, ev in items), submitter))
    return out


def report_message(out: OutgoingReport, from_addr: str, to_addr: str, now: float | None = None) -> bytes:
    """The report mail (RFC 7489 §7.2.1.1): subject, a short text part, the gzip'd XML attachment."""
    rep = out.report
    return report_mail(
        from_addr, to_addr, out.submitter,
        f"Report Domain: {rep.policy.domain} Submitter: {out.submitter} Report-ID: <{rep.report_id}>",
        f"DMARC aggregate report for {rep.policy.domain} from {out.submitter}, "
        f"{rep.messages} message(s), {_day(rep.begin)} to {_day(rep.end)} (UTC).\n",
        out.gzipped(), "application/gzip", out.filename, now=now)


def report_mail(from_addr: str, to_addr: str, submitter: str, subject: str, text: str, attachment: bytes,
                media_type: str, filename: str, *, headers: Sequence[tuple[str, str]] = (),
                report_type: str = "", now: float | None = None) -> bytes:
    """A report mail: a short text part and the report attached (DMARC and TLS-RPT). With
    `report_type`, the container is multipart/report (RFC 6522) of that report type (RFC 8460 §5.3)."""
    msg = EmailMessage(policy=email_policy.SMTP)
    msg["From"] = from_addr
    msg["To"] = to_addr
    msg["Subject"] = subject
    msg["Date"] = format_datetime(_utc(now if now is not None else time.time()))
    msg["Message-ID"] = make_msgid(domain=submitter)
    for name, value in headers:
        msg[name] = value
    msg["MIME-Version"] = "1.0"
    msg.set_content(text)
    maintype, _, subtype = media_type.partition("/")
    msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    if report_type:
        msg.set_type("multipart/report")
        msg.set_param("report-type", report_type)
    return msg.as_bytes()


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))
