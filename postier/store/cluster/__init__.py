"""Cluster mode's storage: mailboxes in PostgreSQL, bodies in S3, changes by LISTEN/NOTIFY (docs/scaling.md).

Its libraries are the optional `cluster` extra (a single-machine install needs none of them). Every
module here is imported only once `[cluster]` is configured or a `postier cluster` command runs; each
of those entry points calls `require_extra()` first, so a missing extra ends with one line naming what
to install, not a traceback. This package itself imports nothing optional, so tools that walk the
package tree (pkgutil, documentation, the type checker) can always load it.
"""

import importlib.util

EXTRA = ("psycopg", "psycopg_pool", "boto3")


def require_extra() -> None:
    """Stop with one line if the `cluster` extra is not installed."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"postier: cluster mode needs {', '.join(missing)}: pip install 'postier[cluster]'")
