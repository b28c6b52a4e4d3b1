"""POP3 server core (RFC 1939, RFC 2449, RFC 2595, RFC 5034): sans-IO session, events and framing."""

from postier.proto.pop3.connection import POP3Connection, POP3Settings, State
from postier.proto.pop3.events import (
    NEED_DATA,
    PAUSED,
    Authenticated,
    Close,
    ConnectionLost,
    Event,
    Login,
    Retrieve,
    ScramLookup,
    Sentinel,
    StartTLS,
    Update,
)
from postier.proto.pop3.framing import MessageEncoder, encode_message

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Authenticated",
    "Close",
    "ConnectionLost",
    "Event",
    "Login",
    "MessageEncoder",
    "POP3Connection",
    "POP3Settings",
    "Retrieve",
    "ScramLookup",
    "Sentinel",
    "StartTLS",
    "State",
    "Update",
    "encode_message",
]
