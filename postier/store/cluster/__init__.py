"""Cluster mode's storage: mailboxes in PostgreSQL, bodies in S3, changes by LISTEN/NOTIFY (docs/scaling.md)."""
