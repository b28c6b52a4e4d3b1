"""Sans-IO IMAP core (RFC 9051 IMAP4rev2, RFC 3501 IMAP4rev1): command reader/parser, responses.

* ``CommandReader`` frames bytes into ``Command`` objects (``commands``), signalling literals with
  ``NeedContinuation`` and reading IDLE/AUTHENTICATE lines as ``RawLine``; errors are ``ParseError``.
* ``response`` builds reply bytes; ``states`` says which command is legal where.
* ``SequenceSet`` and the SEARCH criteria tree (``search``) are shared with ``postier.message``.
"""

from .commands import (
    Append,
    Authenticate,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    Delete,
    Enable,
    Examine,
    Expunge,
    Fetch,
    FetchAttr,
    Id,
    Idle,
    List,
    ListReturn,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    QResync,
    Rename,
    Search,
    Section,
    Select,
    StartTLS,
    Status,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
)
from .errors import ParseError
from ..mutf7 import Mutf7Error, mutf7_decode, mutf7_encode
from .parser import parse_command, parse_date, parse_date_time
from .reader import CommandReader, NeedContinuation, RawLine, ReaderLimits
from .seqset import SequenceSet
from .states import COMMANDS_BY_STATE, State, allowed

__all__ = [
    "COMMANDS_BY_STATE", "Append", "Authenticate", "Capability", "Check", "Close", "Command",
    "CommandReader", "Copy", "Create", "Delete", "Enable", "Examine", "Expunge", "Fetch", "FetchAttr",
    "Id", "Idle", "List", "ListReturn", "Login", "Logout", "Lsub", "Move", "Mutf7Error", "Namespace",
    "NeedContinuation", "Noop", "ParseError", "QResync", "RawLine", "ReaderLimits", "Rename", "Search",
    "Section", "Select", "SequenceSet", "StartTLS", "State", "Status", "Store", "StoreMode", "Subscribe",
    "Unselect", "Unsubscribe", "allowed", "mutf7_decode", "mutf7_encode", "parse_command", "parse_date",
    "parse_date_time",
]
