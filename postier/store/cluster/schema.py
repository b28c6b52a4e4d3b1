"""The PostgreSQL schema of cluster mode: the mailbox index (folders, messages, tombstones, subscriptions,
the full-text rows of bodies: store.cluster.fulltext; the parsed-view cache `body_views` and the
header blocks `body_heads` of store/cluster/cache.py), accounts, DKIM keys, Sieve state (scripts,
vacation/duplicate tracking), the outbound queue (`queue_*`: messages, recipients with their leases,
attempts, sends; queue/cluster.py) and the body collector's `bodies` marks and `gc_state`
(store.cluster.gc).

Every change to a folder's messages updates its `folders` row first (uidnext, highestmodseq) in the
transaction that changes the messages: the row lock orders the writers of one folder, so UIDs and
MODSEQs become visible in the order they were allocated (RFC 9051 §2.3.1.1 strictly ascending UIDs,
RFC 7162 §3.1.1 MODSEQ). A sequence would hand out numbers outside the transaction order.
The rename log (`renames`, numbered per user by `rename_heads`, whose row every rename of the user
takes first) is ordered the same way: IMAP NOTIFY reads it with the folders in one snapshot
(`ClusterMailboxes.names_since`). Tables are added by `CREATE ... IF NOT EXISTS` (and columns by
`ADD COLUMN IF NOT EXISTS`): `ensure_schema` (`postier cluster init`, every node's start) brings an
existing database up to date.
"""

from __future__ import annotations

import time

import psycopg

from .fulltext import create_index
from .cache import DDL as _VIEWS_DDL

__all__ = ["ACCOUNTS_LOCK", "CHANNEL", "ensure_schema"]

#: LISTEN/NOTIFY channel of mailbox changes; the payload is "owner\x1ffolder" (a folder's messages), or
#: "owner\x1fkey\x1forigin" for a names change (store.py `ClusterNotifier._publish`).
CHANNEL = "postier_mail"

_LOCK_KEY = 0x706F7374  # pg_advisory_xact_lock: one node creates the schema at a time

_DDL = """
CREATE SEQUENCE IF NOT EXISTS uidvalidity_seq;
CREATE TABLE IF NOT EXISTS folders (
    id bigserial PRIMARY KEY,
    owner text NOT NULL,
    name text NOT NULL,
    uidvalidity bigint NOT NULL DEFAULT nextval('uidvalidity_seq'),
    uidnext bigint NOT NULL DEFAULT 1,
    highestmodseq bigint NOT NULL DEFAULT 1,
    recent_uid bigint NOT NULL DEFAULT 1,
    special_use text NOT NULL DEFAULT '',
    keywords text[] NOT NULL DEFAULT '{}',
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS messages (
    folder bigint NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid bigint NOT NULL,
    body text NOT NULL,
    size bigint NOT NULL,
    flags integer NOT NULL DEFAULT 0,
    keywords text NOT NULL DEFAULT '',
    modseq bigint NOT NULL,
    idate bigint NOT NULL,
    PRIMARY KEY (folder, uid)
);
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (folder, modseq);
CREATE INDEX IF NOT EXISTS messages_body ON messages (body);
CREATE TABLE IF NOT EXISTS expunged (
    folder bigint NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid bigint NOT NULL,
    modseq bigint NOT NULL,
    PRIMARY KEY (folder, uid)
);
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged (folder, modseq);
CREATE TABLE IF NOT EXISTS bodies (
    hash text PRIMARY KEY,
    last_put timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS gc_state (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    cursor text NOT NULL DEFAULT '',
    finished timestamptz,
    collected bigint NOT NULL DEFAULT 0,
    listed bigint NOT NULL DEFAULT 0,
    adopted bigint NOT NULL DEFAULT 0,
    deleted bigint NOT NULL DEFAULT 0,
    refused bigint NOT NULL DEFAULT 0
);
ALTER TABLE gc_state ADD COLUMN IF NOT EXISTS refused bigint NOT NULL DEFAULT 0;
INSERT INTO gc_state (one) VALUES (true) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS body_text (
    hash text PRIMARY KEY REFERENCES bodies(hash) ON DELETE CASCADE,
    version smallint NOT NULL,
    exact boolean NOT NULL,
    subject text NOT NULL,
    hfrom text NOT NULL,
    hto text NOT NULL,
    hcc text NOT NULL,
    hbcc text NOT NULL,
    leaves text NOT NULL,
    headers text NOT NULL,
    "inner" text NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    owner text NOT NULL,
    name text NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS rename_heads (
    owner text PRIMARY KEY,
    seq bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS renames (
    owner text NOT NULL,
    seq bigint NOT NULL,
    old text NOT NULL,
    new text NOT NULL,
    PRIMARY KEY (owner, seq)
);
CREATE TABLE IF NOT EXISTS sieve_scripts (
    owner text NOT NULL,
    name text NOT NULL,
    body bytea NOT NULL,
    active boolean NOT NULL DEFAULT false,
    PRIMARY KEY (owner, name)
);
CREATE UNIQUE INDEX IF NOT EXISTS sieve_scripts_one_active ON sieve_scripts (owner) WHERE active;
CREATE TABLE IF NOT EXISTS quota_warned (
    owner text PRIMARY KEY,
    warned integer NOT NULL DEFAULT 0,
    low bigint
);
CREATE TABLE IF NOT EXISTS sieve_tracking (
    owner text NOT NULL,
    key bytea NOT NULL,
    until double precision NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE TABLE IF NOT EXISTS queue_messages (
    id text PRIMARY KEY,
    body text NOT NULL,
    sender text NOT NULL,
    created double precision NOT NULL,
    size bigint NOT NULL,
    owner text NOT NULL DEFAULT '',
    envid text NOT NULL DEFAULT '',
    ret text NOT NULL DEFAULT '',
    smtputf8 boolean NOT NULL DEFAULT false,
    eightbit boolean NOT NULL DEFAULT false,
    warned boolean NOT NULL DEFAULT false,
    tls_optional boolean NOT NULL DEFAULT false,
    dsn_until double precision NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_messages_body ON queue_messages (body);
CREATE TABLE IF NOT EXISTS queue_recipients (
    msg_id text NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    address text NOT NULL,
    domain text NOT NULL,
    status text NOT NULL DEFAULT 'queued',
    next_attempt double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_reply text NOT NULL DEFAULT '',
    status_code text NOT NULL DEFAULT '',
    remote_mta text NOT NULL DEFAULT '',
    notify text NOT NULL DEFAULT '',
    orcpt text NOT NULL DEFAULT '',
    dsn text NOT NULL DEFAULT '',
    lease_owner text NOT NULL DEFAULT '',
    lease_until double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (msg_id, address)
);
CREATE INDEX IF NOT EXISTS queue_recipients_due ON queue_recipients (next_attempt) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS queue_recipients_dsn ON queue_recipients (msg_id) WHERE dsn <> '';
CREATE TABLE IF NOT EXISTS queue_attempts (
    id bigserial PRIMARY KEY,
    msg_id text NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    address text NOT NULL,
    time double precision NOT NULL,
    mx text NOT NULL,
    tls text NOT NULL,
    reply text NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_attempts_msg ON queue_attempts (msg_id);
CREATE TABLE IF NOT EXISTS queue_sends (
    owner text NOT NULL,
    time double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_sends_owner ON queue_sends (owner, time);
"""
_DDL += _VIEWS_DDL  # body_views, body_heads: by body hash (store/cluster/cache.py)

# Accounts (postier/accounts.py's tables, store/cluster/accounts.py) and DKIM keys (mailauth/keys.py):
# every node reads them here. `account_version` is bumped by every account write (the nodes'
# resolution caches compare it); `pg_advisory_xact_lock(ACCOUNTS_LOCK)` serializes account writers.
_DDL += """
CREATE TABLE IF NOT EXISTS domains (
    name text PRIMARY KEY,
    catchall text,
    created double precision NOT NULL,
    quota bigint
);
CREATE TABLE IF NOT EXISTS users (
    address text PRIMARY KEY,
    local text NOT NULL,
    domain text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    password text NOT NULL,
    scram text NOT NULL DEFAULT '',
    mailbox_format text NOT NULL DEFAULT 'maildir',
    created double precision NOT NULL,
    admin integer NOT NULL DEFAULT 0,
    quota bigint
);
CREATE INDEX IF NOT EXISTS users_domain ON users (domain);
CREATE TABLE IF NOT EXISTS aliases (
    alias text NOT NULL,
    target text NOT NULL,
    PRIMARY KEY (alias, target)
);
CREATE INDEX IF NOT EXISTS aliases_target ON aliases (target);
CREATE TABLE IF NOT EXISTS settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS account_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n bigint NOT NULL DEFAULT 0
);
INSERT INTO account_version (one, n) VALUES (true, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS dkim_keys (
    domain text NOT NULL,
    selector text NOT NULL,
    algorithm text NOT NULL,
    state text NOT NULL,
    created double precision NOT NULL,
    private_key bytea NOT NULL,
    txt text NOT NULL,
    PRIMARY KEY (domain, selector)
);
"""
ACCOUNTS_LOCK = 0x706F7375  # pg_advisory_xact_lock key of account writes


# sieve_tracking.key is bytea: the keys hold NULs (pipeline/sieve.py), which a text column refuses.


def _body_text_cascade(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Migration of a database made before `body_text` referred to `bodies` (its rows were deleted by
    cluster gc by hand): the rows of bodies without a `bodies` row go (a search's catch-up writes them
    again once the body is adopted, store.cluster.fulltext), then the foreign key is added, so that gc's
    delete of a `bodies` row takes its full-text row along, as it takes `body_views` and `body_heads`.
    Done once: later starts find the constraint."""
    if conn.execute("SELECT 1 FROM pg_constraint WHERE conrelid = 'body_text'::regclass AND contype = 'f'"
                    ).fetchone() is not None:
        return
    conn.execute("DELETE FROM body_text t WHERE NOT EXISTS (SELECT 1 FROM bodies b WHERE b.hash = t.hash)")
    conn.execute("ALTER TABLE body_text ADD FOREIGN KEY (hash) REFERENCES bodies(hash) ON DELETE CASCADE")


def ensure_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Create the tables when missing (idempotent; safe from several nodes at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        for stmt in _DDL.split(";"):
            if stmt.strip():
                conn.execute(stmt.encode())
        _body_text_cascade(conn)
        create_index(conn)  # the trigram index of body_text (store.cluster.fulltext)
        # UIDVALIDITY values start at the current time, as the Maildir store's do, so that a
        # mailbox moved between modes gets a new, larger one (RFC 9051 §2.3.1.1).
        conn.execute("SELECT setval('uidvalidity_seq', greatest(%s, (SELECT last_value FROM uidvalidity_seq)))",
                      (int(time.time()),))
