"""`postier cluster init|status|gc|import-accounts`: create cluster mode's tables and bucket, show whether
this node reaches PostgreSQL and the object store, delete unreferenced bodies (from the table and from a
listing of the bucket), copy a single-machine node's accounts, DKIM keys and Sieve scripts, and its
reports not sent yet (the DMARC and TLS report files), into PostgreSQL (docs/scaling.md). psycopg and boto3 (the `cluster` extra) are
imported only when the command runs, so the CLI works without them in single-machine mode."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ...config import Config, load_config


def _config(args: argparse.Namespace) -> Config:
    from ...cli import CLIError, _config_path

    cfg = load_config(_config_path(args))
    if not cfg.cluster.dsn:
        raise CLIError("cluster mode is not configured ([cluster] dsn)")
    return cfg


def cmd_cluster(args: argparse.Namespace) -> int:
    from . import require_extra

    require_extra()
    import botocore.exceptions
    import psycopg

    from ...cli import CLIError
    from ..errors import StoreError
    from .fulltext import VERSION
    from .schema import ensure_schema
    from .store import open_bodies

    cfg = _config(args)
    if args.action == "import-accounts":
        return _import_accounts(cfg, args)
    bodies = open_bodies(cfg)
    timeout = max(1, int(cfg.cluster.timeout))
    if args.action == "init":
        try:
            with psycopg.connect(cfg.cluster.dsn, connect_timeout=timeout) as conn:
                ensure_schema(conn)
            bodies.ensure_bucket()
        except (psycopg.Error, StoreError, OSError, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as exc:
            raise CLIError(f"cluster init failed: {exc}") from None
        print(f"cluster ready: tables in PostgreSQL, bucket {cfg.cluster.s3_bucket}")
        return 0
    if args.action == "gc":
        from .gc import run
        try:
            with psycopg.connect(cfg.cluster.dsn, connect_timeout=timeout, autocommit=True) as conn:
                ensure_schema(conn)  # gc_state, for a cluster made before it
                done = run(conn, bodies, args.grace, orphans=not args.no_orphans, limit=args.list_limit)
        except (psycopg.Error, StoreError) as exc:
            raise CLIError(f"cluster gc failed: {exc}") from None
        print(f"deleted {done.collected} unreferenced bodies")
        if not args.no_orphans:
            print(f"listed {done.listed} objects of the bucket"
                  f"{' (to its end)' if done.end else ' (the next run goes on from there)'}: "
                  f"{done.adopted} without a row but referenced (row added), "
                  f"{done.deleted} without a row or a reference (deleted)")
        if done.refused:
            print(f"the object store refused to delete {done.refused} bodies (their rows are kept; "
                  "the next run tries again; the log names them)", file=sys.stderr)
            return 1
        return 0
    ok = True
    try:
        with psycopg.connect(cfg.cluster.dsn, connect_timeout=timeout) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            counts = conn.execute(
                "SELECT (SELECT count(DISTINCT owner) FROM folders), (SELECT count(*) FROM folders), "
                "count(*), count(DISTINCT body), coalesce(sum(size), 0) FROM messages").fetchone()
            text = conn.execute(  # store.cluster.fulltext: rows of the current version, trigram indexes
                "SELECT (SELECT count(*) FROM body_text WHERE version = %s), "
                "(SELECT count(*) FROM pg_indexes WHERE tablename = 'body_text' AND indexname LIKE 'body_text_trgm%%')",
                (VERSION,)).fetchone()
            # store.cluster.gc; no table (or no `refused`) before a node or `gc` of this version ran
            gc = conn.execute(
                "SELECT finished, collected, listed, adopted, deleted, cursor, "
                "(to_jsonb(g) ->> 'refused')::bigint FROM gc_state g").fetchone() \
                if conn.execute("SELECT to_regclass('gc_state')").fetchone() != (None,) else None
        assert version is not None and counts is not None and text is not None
        print(f"postgresql: ok (server {version[0]})")
        print(f"  users {counts[0]}, folders {counts[1]}, messages {counts[2]}, bodies {counts[3]}, "
              f"bytes {counts[4]}")
        print(f"  full-text rows {text[0]} (bodies without one are caught up by searches or `postier reindex`), "
              f"trigram index: {'yes' if text[1] else 'no (pg_trgm unavailable: searches read the rows)'}")
        if gc is None or gc[0] is None:
            print("  last gc: never (`postier cluster gc`)")
        else:
            print(f"  last gc: {gc[0]:%Y-%m-%d %H:%M:%S %Z}: {gc[1]} bodies collected; {gc[2]} objects listed, "
                  f"{gc[3]} adopted, {gc[4]} deleted; next listing from {gc[5] or 'the start'}"
                  + (f"; {gc[6]} bodies the object store refused to delete (rows kept)" if gc[6] else ""))
    except psycopg.errors.UndefinedTable:
        print("postgresql: reachable, but no tables: run `postier cluster init`")
        ok = False
    except psycopg.Error as exc:
        print(f"postgresql: UNREACHABLE: {str(exc).strip()}")
        ok = False
    try:
        bodies.client.head_bucket(Bucket=bodies.bucket)
        print(f"object store: ok (bucket {bodies.bucket})")
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        print(f"object store: UNREACHABLE: {exc}")
        ok = False
    return 0 if ok else 1


def _import_accounts(cfg: Config, args: argparse.Namespace) -> int:
    import psycopg

    from ...cli import CLIError
    from ...message.types import AccountError
    from .importer import copy_into, copy_reports, read_source
    from .reports import open_dmarc_reports, open_tls_reports
    from .schema import ensure_schema

    source = Path(args.source) if args.source else cfg.data_dir
    # a data directory, or its accounts file: the keys and scripts are beside it (config.py's layout)
    data_dir = source if source.is_dir() else source.parent
    db = data_dir / cfg.accounts_db.name if source.is_dir() else source
    try:
        src = read_source(db, data_dir / cfg.dkim_dir.name, data_dir / cfg.mail_root.name)
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    try:
        with psycopg.connect(cfg.cluster.dsn, connect_timeout=max(1, int(cfg.cluster.timeout))) as conn:
            ensure_schema(conn)
            out = copy_into(conn, src, overwrite=args.overwrite)
        for conflict in out.conflicts:
            print(f"{'replaced' if args.overwrite else 'conflict'}: {conflict}", file=sys.stderr)
        if out.conflicts and not args.overwrite:
            raise CLIError(f"{len(out.conflicts)} conflict(s) with what PostgreSQL holds: nothing copied "
                           "(--overwrite makes those rows this node's)")
        # the report files beside the accounts file: what the node had not reported yet
        dmarc, tls = open_dmarc_reports(cfg), open_tls_reports(cfg)
        try:
            copy_reports(data_dir, dmarc, tls, time.time(), out)
        finally:
            dmarc.close()
            tls.close()
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    except psycopg.Error as exc:
        raise CLIError(f"cluster import-accounts failed: {str(exc).strip()}") from None
    print(f"from {db}:")
    for line in out.lines():
        print(f"  {line}")
    print("mail is not copied: move it with `postier export` and `postier import maildir`")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cluster", help="cluster mode: create the tables and bucket (init), check them (status), "
                                       "delete unreferenced bodies (gc), copy this node's accounts, DKIM keys "
                                       "and Sieve scripts, and its reports not sent yet, into PostgreSQL "
                                       "(import-accounts)")
    p.add_argument("action", choices=("init", "status", "gc", "import-accounts"))
    p.add_argument("--grace", type=float, default=86400.0, metavar="SECONDS",
                   help="gc: keep bodies uploaded less than this long ago (default a day)")
    p.add_argument("--no-orphans", action="store_true",
                   help="gc: skip the listing of the bucket (objects no row names), collect from the table only")
    p.add_argument("--list-limit", type=int, default=100_000, metavar="N",
                   help="gc: list at most N objects of the bucket per run, going on from the last run's key "
                        "(default 100000)")
    p.add_argument("--from", dest="source", metavar="PATH",
                   help="import-accounts: a single-machine data directory or its accounts.sqlite, "
                        "with the DKIM keys, Sieve scripts and report files beside it "
                        "(default this node's data directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="import-accounts: replace rows that PostgreSQL holds with other content")
    p.set_defaults(func=cmd_cluster)
