"""Cluster mode's storage: mailboxes in PostgreSQL, bodies in S3, changes by LISTEN/NOTIFY (docs/scaling.md).

Its libraries are the optional `cluster` extra (a single-machine install needs none of them); every
module here is imported only once `[cluster]` is configured or a `postier cluster` command runs, and
without the extra that first import ends with one line naming what to install, not a traceback.
"""

import importlib.util

_MISSING = [m for m in ("psycopg", "psycopg_pool", "boto3") if importlib.util.find_spec(m) is None]
if _MISSING:
    raise SystemExit(f"postier: cluster mode needs {', '.join(_MISSING)}: pip install 'postier[cluster]'")
