"""Copy a single-machine node's accounts, DKIM keys and Sieve scripts into cluster mode's PostgreSQL
(`postier cluster import-accounts`, docs/scaling.md).

What a node kept in its data directory becomes rows of the tables of schema.py, as they are, so that
nothing needs making again: domains, users (the password hash and SCRAM keys as stored, never made
again from a password; quotas, mailbox format and the console's admin flag), aliases and settings
from the SQLite accounts file (read-only), DKIM keys from `dkim/` (the private key's PEM as stored,
selector, algorithm, rotation state, creation time) and each user's Sieve scripts, active choice
and unexpired vacation/duplicate tracking (RFC 5230 §4.1, RFC 7352 §3) from `mail/DOMAIN/LOCAL/sieve/`.

Everything is one transaction under the account writers' advisory lock (and the locks of each
domain's keys and each user's scripts that `ClusterKeyStore` and `ClusterScripts` take), so two
imports at once run one after the other and the second finds everything there. A row already
present and equal is skipped; `created` times are copied but not compared (a domain added again by
hand is the same domain). A row present with other content is a conflict: every conflict is named
and nothing at all is copied, unless `overwrite`, which makes the rows the file's. Tracking entries
never conflict: each keeps the later of its two expiry times. Nothing is ever deleted from PostgreSQL. Mail itself is not copied here: `postier export` and `postier import
maildir` move it.

`copy_reports` then copies the node's report files beside the accounts file (`dmarc.sqlite`,
`tlsrpt.sqlite`; a missing one holds nothing) into the shared report tables, so that what the node
recorded but had not reported yet is reported by the cluster's daily job: the DMARC results not
reported yet, the TLS outcomes still counted (added to the shared counts) and the reports others
sent it (the admin console and `postier dmarc|tls reports` show them). The rules are the stores'
(`ReportDB.import_from`, written once for both): the live retention (nothing older than
KEEP_DAYS) and the days' bounds of distinct DMARC results and TLS outcomes hold, what the node
already sent is not copied. A rerun copies nothing: the rows have no natural key (a DMARC result
and a TLS outcome are running counts), so the source file is given a random id once (its
`report_origin` table; the one write into the node's files, besides the counting columns a DMARC
file written before them gets when it is opened) and PostgreSQL notes, in the transaction that
copies them, each row copied by that id and row id with its count (only a later increase would be
added). Two imports of the same file at once take turns on an advisory lock named by that id.
Received reports are kept once per (organization, report id), as when they arrive. The log of
reports the node sent (`report_out`: what `postier dmarc sent` and `postier tls reports --sent`
list) is copied whole, each entry with its time, noted in the same way by the file's id and its row
id (a count of 1), so a rerun copies only what the node logged since.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from ...mailauth.keys import KeyError_, KeyStore
from ...mailauth.reportdb import ImportTally, ReportDB
from ...mailauth.reports import ReportStore
from ...mailauth.tlsrpt import TLSReportStore
from ...message.types import AccountError, User
from ..reportdb import DMARC_FILE, TLS_FILE
from ..sieve import FileSieveStorage, ScriptError
from .schema import ACCOUNTS_LOCK
from .sieve import _user_key

__all__ = ["KINDS", "REPORT_KINDS", "Conflict", "Outcome", "Source", "copy_into", "copy_reports", "read_source"]

type Conn = psycopg.Connection[tuple[Any, ...]]
type Row = tuple[object, ...]

#: table -> (key columns, compared columns, copied but not compared); the kinds in the order printed
_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "domains": (("name",), ("catchall", "quota"), ("created",)),
    "users": (("address",), ("local", "domain", "password", "scram", "mailbox_format", "admin", "quota"),
              ("created",)),
    "settings": (("key",), ("value",), ()),
    "dkim_keys": (("domain", "selector"), ("algorithm", "state", "private_key", "txt"), ("created",)),
    "sieve_scripts": (("owner", "name"), ("body", "active"), ()),
}
KINDS = ("domains", "users", "aliases", "settings", "dkim_keys", "sieve_scripts", "sieve_tracking")
#: what `copy_reports` copies, in the order printed
REPORT_KINDS = ("dmarc_results", "dmarc_reports", "dmarc_sent", "tls_sessions", "tls_reports", "tls_sent")
_REPORT_LABEL = {"dmarc_results": "DMARC results not reported yet", "dmarc_reports": "DMARC reports received",
                 "dmarc_sent": "DMARC reports sent (log)", "tls_sessions": "TLS sessions not reported yet",
                 "tls_reports": "TLS reports received", "tls_sent": "TLS reports sent (log)"}
_LABEL = {"domains": "domain", "users": "user", "aliases": "alias", "settings": "setting",
          "dkim_keys": "DKIM key", "sieve_scripts": "Sieve script", "sieve_tracking": "Sieve tracking entry"}
#: the single-machine columns an older accounts file may lack, with the values its migration gives them
_DEFAULTS: dict[str, object] = {"admin": 0, "quota": None, "scram": "", "mailbox_format": "maildir"}


@dataclass
class Source:
    """What one data directory holds: per table, key -> the other columns (`_TABLES` order)."""

    rows: dict[str, dict[Row, Row]] = field(default_factory=lambda: {t: {} for t in _TABLES})
    aliases: dict[str, frozenset[str]] = field(default_factory=dict)
    #: (owner, key) -> until: the vacation replies sent and message ids seen that still count
    tracking: dict[tuple[str, bytes], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Conflict:
    kind: str
    name: str
    columns: tuple[str, ...]

    def __str__(self) -> str:
        return f"{_LABEL[self.kind]} {self.name} differs ({', '.join(self.columns)})"


@dataclass
class Outcome:
    copied: Counter[str] = field(default_factory=Counter)
    replaced: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)
    conflicts: list[Conflict] = field(default_factory=list)
    #: report rows left out (expired, or over the day's bound of TLS outcomes)
    skipped: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        return [f"{kind.replace('_', ' ')}: {self.copied[kind]} copied, {self.replaced[kind]} replaced, "
                f"{self.unchanged[kind]} unchanged" for kind in KINDS] + [
                f"{_REPORT_LABEL[kind]}: {self.copied[kind]} copied, {self.unchanged[kind]} unchanged"
                + (f", {self.skipped[kind]} left out (expired or over the day's bound)" if self.skipped[kind] else "")
                for kind in REPORT_KINDS]

    def add(self, kind: str, tally: ImportTally) -> None:
        self.copied[kind] += tally.copied
        self.unchanged[kind] += tally.unchanged
        self.skipped[kind] += tally.skipped


def _sqlite_rows(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - a table name of _TABLES, not input
    names = [d[0] for d in cur.description]
    return [{**_DEFAULTS, **dict(zip(names, r, strict=True))} for r in cur]


def read_source(accounts_db: Path, dkim_dir: Path, mail_root: Path) -> Source:
    """Read a single-machine node's accounts file (read-only), DKIM keys and Sieve scripts."""
    if not accounts_db.is_file():
        raise AccountError(f"no accounts file at {accounts_db}")
    src = Source()
    try:
        conn = sqlite3.connect(accounts_db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise AccountError(f"cannot open {accounts_db}: {exc}") from None
    try:
        for table in ("domains", "users", "settings"):
            keys, compared, extra = _TABLES[table]
            for r in _sqlite_rows(conn, table):
                src.rows[table][tuple(r[k] for k in keys)] = tuple(r[c] for c in compared + extra)
        targets: dict[str, set[str]] = {}
        for alias, target in conn.execute("SELECT alias, target FROM aliases"):
            targets.setdefault(alias, set()).add(target)
        src.aliases = {a: frozenset(t) for a, t in targets.items()}
    except sqlite3.Error as exc:
        raise AccountError(f"cannot read {accounts_db}: {exc}") from None
    finally:
        conn.close()
    store = KeyStore(dkim_dir)
    for domain in store.domains():
        try:
            for key in store.keys(domain):
                src.rows["dkim_keys"][(key.domain, key.selector)] = (
                    key.algorithm, key.state, store.private_key(key), key.txt, key.created)
        except (OSError, KeyError_) as exc:
            raise AccountError(f"cannot read the DKIM keys of {domain}: {exc}") from None
    sieve = FileSieveStorage(mail_root)
    for (address,), row in src.rows["users"].items():
        user = User(str(address), str(row[0]), str(row[1]), "maildir")
        try:
            scripts = sieve.scripts(user)
            for name, active in scripts.list():
                src.rows["sieve_scripts"][(user.address, name)] = (scripts.get(name), active)
            _read_tracking(scripts.root / ".tracking.sqlite", user.address, src.tracking)
        except (OSError, ScriptError, AccountError, sqlite3.Error) as exc:
            raise AccountError(f"cannot read the Sieve scripts of {address}: {exc}") from None
    return src


def _read_tracking(path: Path, owner: str, into: dict[tuple[str, bytes], float]) -> None:
    """The entries of a user's `store.sieve.TrackingStore` file that have not expired."""
    if not path.is_file():
        return
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    try:
        for key, until in conn.execute("SELECT key, until FROM seen WHERE until > ?", (time.time(),)):
            into[(owner, str(key).encode())] = float(until)  # bytea there: the keys may hold NULs
    finally:
        conn.close()


def _differing(names: tuple[str, ...], mine: Row, theirs: Row) -> tuple[str, ...]:
    return tuple(n for n, a, b in zip(names, mine, theirs, strict=False) if _norm(a) != _norm(b))


def _norm(v: object) -> object:
    return bytes(v) if isinstance(v, memoryview) else v


def _where(keys: tuple[str, ...]) -> str:
    return " AND ".join(f"{k} = %s" for k in keys)


def _locks(conn: Conn, src: Source) -> None:
    """The locks of every writer this import may meet, in one order (each other writer holds one)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ACCOUNTS_LOCK,))  # accounts.Accounts' writers
    for domain in sorted({str(d) for d, _s in src.rows["dkim_keys"]}):  # ClusterKeyStore._locked
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ACCOUNTS_LOCK, domain))
    for owner in sorted({str(o) for o, _n in src.rows["sieve_scripts"]}):  # ClusterScripts._tx
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_user_key(owner),))


def _active_conflicts(conn: Conn, src: Source, out: Outcome) -> list[tuple[str, str]]:
    """DKIM keys of PostgreSQL that are not in the file but active for an algorithm the file has an
    active key of in that domain (two would sign), and likewise active scripts: conflicts; returns
    the keys (domain, selector) to make published."""
    clash: list[tuple[str, str]] = []
    active_keys = {(str(d), str(row[0])) for (d, _s), row in src.rows["dkim_keys"].items() if row[1] == "active"}
    for domain, algorithm in sorted(active_keys):
        for (selector,) in conn.execute(
                "SELECT selector FROM dkim_keys WHERE domain = %s AND algorithm = %s AND state = 'active'",
                (domain, algorithm)):
            if (domain, selector) not in src.rows["dkim_keys"]:
                clash.append((domain, selector))
                out.conflicts.append(Conflict("dkim_keys", f"{domain}/{selector}", ("state",)))
    for owner, name in _active_scripts(src):
        for (other,) in conn.execute("SELECT name FROM sieve_scripts WHERE owner = %s AND active AND name <> %s",
                                     (owner, name)):
            if (owner, other) not in src.rows["sieve_scripts"]:
                out.conflicts.append(Conflict("sieve_scripts", f"{owner}/{other}", ("active",)))
    return clash


def _active_scripts(src: Source) -> list[tuple[str, str]]:
    return sorted((str(o), str(n)) for (o, n), row in src.rows["sieve_scripts"].items() if row[1])


def copy_into(conn: Conn, src: Source, overwrite: bool = False) -> Outcome:
    """Copy `src` into the tables in one transaction (`conn` must not be in one). With conflicts and
    no `overwrite`, nothing is written and the outcome lists them."""
    out = Outcome()
    with conn.transaction() as tx:
        _locks(conn, src)
        plan: list[tuple[bytes, tuple[object, ...]]] = []
        for table, (keys, compared, extra) in _TABLES.items():
            cols = keys + compared + extra
            for key, values in sorted(src.rows[table].items(), key=lambda kv: repr(kv[0])):
                have = conn.execute(f"SELECT {', '.join(compared)} FROM {table} WHERE {_where(keys)}".encode(),
                                    key).fetchone()
                if have is None:
                    out.copied[table] += 1
                    plan.append((f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                                 f"({', '.join(['%s'] * len(cols))})".encode(), key + values))
                    continue
                differ = _differing(compared, values, tuple(have))
                if not differ:
                    out.unchanged[table] += 1
                    continue
                out.conflicts.append(Conflict(table, "/".join(str(k) for k in key), differ))
                out.replaced[table] += 1
                sets = ", ".join(f"{c} = %s" for c in compared + extra)
                plan.append((f"UPDATE {table} SET {sets} WHERE {_where(keys)}".encode(), values + key))
            if table == "users":  # aliases after the users and domains, as the file lists them
                plan.extend(_aliases(conn, src, out))
        clash = _active_conflicts(conn, src, out)
        if out.conflicts and not overwrite:
            out.copied.clear()
            out.replaced.clear()
            raise psycopg.Rollback(tx)
        # the file's active key or script wins: the others stand down first (as `dkim activate` makes
        # the previous key published), so no domain signs twice and the partial unique index holds
        for domain, selector in clash:
            conn.execute("UPDATE dkim_keys SET state = 'published' WHERE domain = %s AND selector = %s",
                         (domain, selector))
        for owner, name in _active_scripts(src):
            conn.execute("UPDATE sieve_scripts SET active = false WHERE owner = %s AND active AND name <> %s",
                         (owner, name))
        for sql, params in plan:
            conn.execute(sql, params)
        for (owner, entry), until in sorted(src.tracking.items()):  # merged as TrackingStore.record does
            n = conn.execute("INSERT INTO sieve_tracking (owner, key, until) VALUES (%s, %s, %s) "
                             "ON CONFLICT (owner, key) DO UPDATE SET until = excluded.until "
                             "WHERE sieve_tracking.until < excluded.until", (owner, entry, until)).rowcount
            out.copied["sieve_tracking"] += n
            out.unchanged["sieve_tracking"] += 1 - n
        if plan or clash:
            conn.execute("UPDATE account_version SET n = n + 1")  # the nodes' resolution caches
    return out


def _aliases(conn: Conn, src: Source, out: Outcome) -> list[tuple[bytes, tuple[object, ...]]]:
    """An alias is its set of targets: equal, missing (copied) or other (a conflict, replaced)."""
    plan: list[tuple[bytes, tuple[object, ...]]] = []
    for alias, targets in sorted(src.aliases.items()):
        have = {str(t) for (t,) in conn.execute("SELECT target FROM aliases WHERE alias = %s", (alias,))}
        if have == targets:
            out.unchanged["aliases"] += 1
            continue
        if have:
            out.conflicts.append(Conflict("aliases", alias, ("targets",)))
            out.replaced["aliases"] += 1
        else:
            out.copied["aliases"] += 1
        plan.append((b"DELETE FROM aliases WHERE alias = %s", (alias,)))
        plan.extend((b"INSERT INTO aliases (alias, target) VALUES (%s, %s)", (alias, t)) for t in sorted(targets))
    return plan


def copy_reports(data_dir: Path, dmarc: ReportStore, tls: TLSReportStore, now: float, out: Outcome) -> None:
    """Copy the report files of the data directory `data_dir` into the stores `dmarc` and `tls`
    (cluster mode's, in PostgreSQL; see the module docstring); a file that is not there holds
    nothing. Each store's copy is one transaction. `now` decides what has expired."""
    try:
        _copy_store(data_dir / DMARC_FILE, ReportStore, dmarc, now, out, ("dmarc_results", "dmarc_reports", "dmarc_sent"))
        _copy_store(data_dir / TLS_FILE, TLSReportStore, tls, now, out, ("tls_sessions", "tls_reports", "tls_sent"))
    except sqlite3.Error as exc:
        raise AccountError(f"cannot copy the report files of {data_dir}: {exc}") from None


def _copy_store[S: ReportDB[Any]](path: Path, open_: Callable[[Path], S], target: S, now: float, out: Outcome,
                                  kinds: tuple[str, str, str]) -> None:
    """The report file `path` (when there is one) into `target` (`ReportDB.import_from`), its
    counted rows, received reports and log of reports sent counted in `out` as `kinds`."""
    if not path.is_file():
        return
    src = open_(path)
    sent = ImportTally()
    try:
        counted, received = target.import_from(src, now, sent)
    finally:
        src.close()
    for kind, tally in zip(kinds, (counted, received, sent), strict=True):
        out.add(kind, tally)
