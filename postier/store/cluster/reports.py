"""Cluster mode's report stores in PostgreSQL: DMARC results and TLS outcomes counted by every node in one place.

`PGReportStorage` is the `mailauth.reportdb.ReportStorage` of cluster mode. The stores
(`mailauth.reports.ReportStore`, `mailauth.tlsrpt.TLSReportStore`) keep every rule and run their
statements on the same table names as their SQLite files, here in a PostgreSQL schema of their own
(`dmarc`, `tlsrpt`) that each connection's `search_path` selects, through the account storage's
connection (store/cluster/accounts.py: `?` placeholders, autocommit, connected again after a loss).
TLS outcomes and DMARC results are summed per day and outcome in place (`INSERT ... ON CONFLICT DO
UPDATE`), so two nodes counting at once lose nothing. The daily report job
takes each report's claim (`ReportDB.claim`, a row of `report_claim` per kind, day and policy
domain) before it reads that report's rows and sends it, so the nodes share the reports and
one node sends each. `report_origin` and `report_imported` serve `import_from` (a single machine's
files copied in by `postier cluster import-accounts`).

PostgreSQL out of reach is `StoreUnavailable`: the recorder logs it and the delivery goes on, a
received report is not kept (the mail is delivered), the report run is tried again the next day.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from ...accounts import Connection
from ...config import Config
from ...mailauth.reports import ReportStore
from ...mailauth.tlsrpt import TLSReportStore
from .accounts import _PGConnection, _Schema

__all__ = ["PGReportStorage", "open_dmarc_reports", "open_tls_reports"]

_DOWN = "report database unavailable, try again later"
_LOCK_KEY = 0x706F7376  # pg_advisory_xact_lock: one node creates a report schema at a time

#: mailauth/reportdb.py's CLAIM_SCHEMA
_CLAIM = """
CREATE TABLE IF NOT EXISTS {s}.report_claim (
    name text PRIMARY KEY,
    until double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.report_origin (
    id text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.report_imported (
    origin text NOT NULL,
    item text NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (origin, item)
);
"""

#: mailauth/tlsrpt.py's tables. An outcome's policy (the TLSA records, the STS lines) may be longer
#: than a B-tree entry can hold: the unique key holds its digest (and the reason's).
_TLSRPT = _CLAIM + """
CREATE TABLE IF NOT EXISTS {s}.session (
    id bigserial PRIMARY KEY,
    day bigint NOT NULL,
    domain text NOT NULL,
    policy text NOT NULL,
    result text NOT NULL,
    sending_ip text NOT NULL,
    receiving_mx text NOT NULL,
    receiving_ip text NOT NULL,
    reason text NOT NULL,
    count bigint NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS session_key ON {s}.session
    (day, domain, md5(policy), result, sending_ip, receiving_mx, receiving_ip, md5(reason));
CREATE TABLE IF NOT EXISTS {s}.report_in (
    id bigserial PRIMARY KEY,
    received double precision NOT NULL,
    org_name text NOT NULL,
    report_id text NOT NULL,
    start bigint NOT NULL,
    document text NOT NULL,
    authenticated integer NOT NULL,
    UNIQUE (org_name, report_id)
);
CREATE TABLE IF NOT EXISTS {s}.report_domain (
    report bigint NOT NULL REFERENCES {s}.report_in(id) ON DELETE CASCADE,
    domain text NOT NULL
);
CREATE INDEX IF NOT EXISTS report_domain_domain ON {s}.report_domain (domain);
CREATE TABLE IF NOT EXISTS {s}.report_out (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    domain text NOT NULL,
    report_id text NOT NULL,
    rua text NOT NULL,
    successes bigint NOT NULL,
    failures bigint NOT NULL,
    status text NOT NULL
);
"""

#: mailauth/reports.py's tables. The counting columns (day, digest, count) are added to tables made
#: before them, whose rows (one message each) stay as they are (count 1, no day or digest).
_DMARC = _CLAIM + """
CREATE TABLE IF NOT EXISTS {s}.evaluation (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    source_ip text NOT NULL,
    header_from text NOT NULL,
    envelope_from text NOT NULL,
    policy text NOT NULL,
    policy_domain text NOT NULL,
    rua text NOT NULL,
    disposition text NOT NULL,
    dkim text NOT NULL,
    spf text NOT NULL,
    auth text NOT NULL,
    reported integer NOT NULL DEFAULT 0,
    day bigint,
    digest text,
    count bigint NOT NULL DEFAULT 1
);
ALTER TABLE {s}.evaluation ADD COLUMN IF NOT EXISTS day bigint;
ALTER TABLE {s}.evaluation ADD COLUMN IF NOT EXISTS digest text;
ALTER TABLE {s}.evaluation ADD COLUMN IF NOT EXISTS count bigint NOT NULL DEFAULT 1;
CREATE UNIQUE INDEX IF NOT EXISTS evaluation_key ON {s}.evaluation (day, digest);
CREATE INDEX IF NOT EXISTS evaluation_pending ON {s}.evaluation (reported, at);
CREATE TABLE IF NOT EXISTS {s}.report_in (
    id bigserial PRIMARY KEY,
    received double precision NOT NULL,
    org_name text NOT NULL,
    email text NOT NULL,
    report_id text NOT NULL,
    domain text NOT NULL,
    begin bigint NOT NULL,
    "end" bigint NOT NULL,
    policy text NOT NULL,
    authenticated integer NOT NULL,
    UNIQUE (org_name, report_id)
);
CREATE TABLE IF NOT EXISTS {s}.report_row (
    id bigserial PRIMARY KEY,
    report bigint NOT NULL REFERENCES {s}.report_in(id) ON DELETE CASCADE,
    source_ip text NOT NULL,
    count bigint NOT NULL,
    disposition text NOT NULL,
    dkim text NOT NULL,
    spf text NOT NULL,
    header_from text NOT NULL,
    auth text NOT NULL
);
CREATE INDEX IF NOT EXISTS report_row_report ON {s}.report_row (report);
CREATE TABLE IF NOT EXISTS {s}.report_out (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    domain text NOT NULL,
    report_id text NOT NULL,
    begin bigint NOT NULL,
    "end" bigint NOT NULL,
    rua text NOT NULL,
    messages bigint NOT NULL,
    status text NOT NULL
);
"""

_SCHEMAS = {"tlsrpt": _TLSRPT, "dmarc": _DMARC}


class _ReportSchema(_Schema):
    """Creates one store's tables at the first connection, and selects them on every connection."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        if not self.done:
            with self.lock:
                if not self.done:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.name}".encode())
                        for stmt in _SCHEMAS[self.name].format(s=self.name).split(";"):
                            if stmt.strip():
                                conn.execute(stmt.encode())
                    self.done = True
        conn.execute(f"SET search_path TO {self.name}".encode())


class PGReportStorage:
    """One report store's tables in PostgreSQL (`mailauth.reportdb.ReportStorage`)."""

    dialect = "postgresql"

    def __init__(self, dsn: str, name: str, timeout: float = 5.0):
        if name not in _SCHEMAS:
            raise ValueError(f"no report store {name!r}")
        self.dsn = dsn
        self.timeout = timeout
        self._schema = _ReportSchema(name)

    def connect(self) -> Connection:
        return _PGConnection(self.dsn, self.timeout, self._schema)  # connected (tables made) at first use

    @contextmanager
    def write(self, conn: Connection) -> Iterator[None]:
        assert isinstance(conn, _PGConnection)
        with conn.transaction(_DOWN):
            yield


def open_dmarc_reports(config: Config) -> ReportStore:
    """The DMARC report store of `[cluster]`."""
    return ReportStore(_storage(config.cluster.dsn, "dmarc", config.cluster.timeout))


def open_tls_reports(config: Config) -> TLSReportStore:
    """The TLS report store of `[cluster]`."""
    return TLSReportStore(_storage(config.cluster.dsn, "tlsrpt", config.cluster.timeout))


@functools.lru_cache(maxsize=8)
def _storage(dsn: str, name: str, timeout: float) -> PGReportStorage:
    return PGReportStorage(dsn, name, timeout)
