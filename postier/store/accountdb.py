"""Which account database and DKIM key store a node uses: SQLite and files, or PostgreSQL in cluster mode.

Every command and the server open them here, so that with `[cluster] dsn` set each of them works on
the shared tables (store/cluster/accounts.py, docs/scaling.md) and without it on the local files.
The cluster modules are imported only in cluster mode, after `require_extra()`.
"""

from __future__ import annotations

from ..accounts import Accounts, AccountStorage
from ..config import Config
from ..mailauth.keys import KeyStore

__all__ = ["open_accounts", "open_key_store"]


def open_accounts(config: Config) -> Accounts:
    """The accounts of this installation, with the `[mailbox]` and `[limits]` settings they use."""
    db: AccountStorage | None = None
    if config.cluster.dsn:
        from .cluster import require_extra
        require_extra()
        from .cluster.accounts import open_accounts_storage
        db = open_accounts_storage(config)
    accounts = Accounts(db or config.accounts_db, config.mailbox.recipient_delimiter, config.mailbox.default_format,
                        config.limits.default_quota)
    a = config.auth
    accounts.set_hash_cost(a.argon2_time_cost, a.argon2_memory_kib, a.argon2_parallelism)
    return accounts


def open_key_store(config: Config) -> KeyStore:
    """The DKIM keys of this installation."""
    if config.cluster.dsn:
        from .cluster import require_extra
        require_extra()
        from .cluster.accounts import open_key_store as open_cluster_keys
        return open_cluster_keys(config)
    return KeyStore(config.dkim_dir)
