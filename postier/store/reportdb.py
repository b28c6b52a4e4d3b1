"""Which report stores a node uses: the SQLite files in DATA_DIR, or PostgreSQL in cluster mode.

The server, `postier dmarc`, `postier tls` and the admin console open the DMARC report store
(`mailauth.reports.ReportStore`) and the TLS report store (`mailauth.tlsrpt.TLSReportStore`) here,
so that with `[cluster] dsn` set every node records into and reads the shared tables
(store/cluster/reports.py, docs/scaling.md) and without it the local files. The cluster modules
are imported only in cluster mode, after `require_extra()`.
"""

from __future__ import annotations

from ..config import Config
from ..mailauth.reports import ReportStore
from ..mailauth.tlsrpt import TLSReportStore

__all__ = ["DMARC_FILE", "TLS_FILE", "open_dmarc_reports", "open_tls_reports"]

DMARC_FILE = "dmarc.sqlite"  # in DATA_DIR
TLS_FILE = "tlsrpt.sqlite"


def open_dmarc_reports(config: Config) -> ReportStore:
    """The DMARC aggregate report store (`data_dir/dmarc.sqlite`)."""
    if config.cluster.dsn:
        from .cluster import require_extra
        require_extra()
        from .cluster.reports import open_dmarc_reports as open_cluster_dmarc
        return open_cluster_dmarc(config)
    return ReportStore(config.data_dir / DMARC_FILE)


def open_tls_reports(config: Config) -> TLSReportStore:
    """The TLS report store (`data_dir/tlsrpt.sqlite`)."""
    if config.cluster.dsn:
        from .cluster import require_extra
        require_extra()
        from .cluster.reports import open_tls_reports as open_cluster_tls
        return open_cluster_tls(config)
    return TLSReportStore(config.data_dir / TLS_FILE)
