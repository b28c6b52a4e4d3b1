"""`postier cluster init|status|gc`: create cluster mode's tables and bucket, show whether this node
reaches PostgreSQL and the object store, delete unreferenced bodies (docs/scaling.md). psycopg and boto3 (the `cluster` extra) are
imported only when the command runs, so the CLI works without them in single-machine mode."""

from __future__ import annotations

import argparse

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
        from .gc import collect
        try:
            with psycopg.connect(cfg.cluster.dsn, connect_timeout=timeout, autocommit=True) as conn:
                n = collect(conn, bodies, args.grace)
        except (psycopg.Error, StoreError) as exc:
            raise CLIError(f"cluster gc failed: {exc}") from None
        print(f"deleted {n} unreferenced bodies")
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
        assert version is not None and counts is not None and text is not None
        print(f"postgresql: ok (server {version[0]})")
        print(f"  users {counts[0]}, folders {counts[1]}, messages {counts[2]}, bodies {counts[3]}, "
              f"bytes {counts[4]}")
        print(f"  full-text rows {text[0]} (bodies without one are caught up by searches or `postier reindex`), "
              f"trigram index: {'yes' if text[1] else 'no (pg_trgm unavailable: searches read the rows)'}")
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cluster", help="cluster mode: create the tables and bucket (init), check them (status), "
                                       "delete unreferenced bodies (gc)")
    p.add_argument("action", choices=("init", "status", "gc"))
    p.add_argument("--grace", type=float, default=86400.0, metavar="SECONDS",
                   help="gc: keep bodies uploaded less than this long ago (default a day)")
    p.set_defaults(func=cmd_cluster)
