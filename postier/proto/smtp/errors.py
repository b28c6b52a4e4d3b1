"""The two error types of the SMTP cores (RFC 5321): peer faults and caller faults."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol (a malformed reply, an injection)."""


class AddressError(ProtocolError):
    """A Path or Mailbox does not follow RFC 5321 §4.1.2 (or RFC 6531 for SMTPUTF8)."""


class UsageError(RuntimeError):
    """The code driving a core called it out of turn (a bug in the caller, never the peer's doing)."""
