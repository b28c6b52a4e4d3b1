"""IMAP command grammar (RFC 9051 §9, RFC 3501 §9 and extensions): one framed command -> ``Command``.

``parse_command`` takes one complete command exactly as framed by ``CommandReader``: the lines
with their CRLF and every literal inline after its ``{n}``/``{n+}``/``~{n}`` marker. It is a
recursive-descent parser over that buffer that raises only ``ParseError`` (carrying the tag once it
is known). Extensions covered: LITERAL+/- (RFC 7888), BINARY (RFC 3516), CONDSTORE/QRESYNC
(RFC 7162), ENABLE (RFC 5161), ESEARCH (RFC 4731), SEARCHRES (RFC 5182), LIST-EXTENDED (RFC 5258),
LIST-STATUS (RFC 5819), SPECIAL-USE / CREATE-SPECIAL-USE (RFC 6154), MOVE (RFC 6851), UIDPLUS
(RFC 4315), SASL-IR (RFC 4959), ID (RFC 2971), IDLE (RFC 2177), UNSELECT (RFC 3691).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import re
from collections.abc import Callable, Mapping

from .commands import (
    SORT_KEYS,
    THREAD_ALGORITHMS,
    Append,
    AppendMessage,
    Authenticate,
    Capability,
    CatPart,
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
    GetQuota,
    GetQuotaRoot,
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
    Notify,
    NotifyGroup,
    QResync,
    Rename,
    Search,
    Section,
    Sort,
    SortCriterion,
    Select,
    SetQuota,
    SpooledLiteral,
    StartTLS,
    Status,
    Store,
    Thread,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
)
from .errors import ParseError
from ..mutf7 import Mutf7Error, mutf7_decode
from .search import (
    AllKey,
    AndKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    NotKey,
    OrKey,
    SearchKey,
    SeqSetKey,
    SizeKey,
    TextKey,
    WithinKey,
)
from .seqset import MAX_NUMBER, SequenceSet

__all__ = ["DEFAULT_MAX_DEPTH", "STATUS_ITEMS", "parse_command", "parse_date", "parse_date_time", "parse_section"]

DEFAULT_MAX_DEPTH = 32
MAX_NUMBER64 = 2**63 - 1  # RFC 9051 §9 number64

# RFC 9051 §9: ATOM-CHAR is any CHAR except atom-specials: ( ) { SP CTL % * " \ ]
_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_ASTRING = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\]+')  # ASTRING-CHAR adds "]"
_LIST_CHARS = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\\]+')  # list-char adds % * ]
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')  # ASTRING-CHAR except "+"
_LITERAL = re.compile(rb"(~?)\{(\d{1,19})(\+?)\}\r\n")
_FETCH_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SEQSET = re.compile(rb"[0-9*:,$]+")
_DIGITS = re.compile(rb"\d+")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext

_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}

_SYSTEM_FLAGS = {f.upper(): f for f in (
    "\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")}

# RFC 9051 §6.3.11, RFC 3501 §6.3.10, RFC 8438 (SIZE), RFC 7162 §3.1.7 (HIGHESTMODSEQ),
# RFC 7889 (APPENDLIMIT)
STATUS_ITEMS = frozenset({
    "MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "RECENT", "HIGHESTMODSEQ",
    "APPENDLIMIT",
    "DELETED-STORAGE",  # RFC 9208 §4.2
})
_LIST_SELECT = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_SEARCH_RETURN = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
_SORT_RETURN = _SEARCH_RETURN | {"PARTIAL", "CONTEXT", "UPDATE"}  # RFC 5267 §3, §4

_MACROS = {  # RFC 9051 §6.4.5
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE_FETCH = frozenset({
    "ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE", "RFC822.TEXT",
    "BODY", "BODYSTRUCTURE", "UID", "MODSEQ",
})


class _Scanner:
    """Cursor over one framed command; every method consumes exactly its grammar element."""

    def __init__(self, data: bytes, utf8: bool, max_depth: int,
                 spooled: Mapping[int, SpooledLiteral] | None = None) -> None:
        self.data = data
        self.spooled = spooled or {}  # offset where a literal's octets would start -> its file
        self.pos = 0
        self.tag: str | None = None
        self.utf8 = utf8
        self.max_depth = max_depth
        self.depth = 0

    # -- primitives -------------------------------------------------------------------------

    def error(self, message: str, code: str | None = None, status: str = "BAD") -> ParseError:
        return ParseError(message, tag=self.tag, code=code, status=status)

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def at(self, token: bytes) -> bool:
        return self.data.startswith(token, self.pos)

    def at_ci(self, token: bytes) -> bool:
        return self.data[self.pos : self.pos + len(token)].upper() == token

    def expect(self, token: bytes, what: str | None = None) -> None:
        if not self.data.startswith(token, self.pos):
            raise self.error(f"Expected {what or token.decode()}")
        self.pos += len(token)

    def sp(self) -> None:
        self.expect(b" ", "SP")

    def at_end(self) -> bool:
        return self.pos + 2 == len(self.data) and self.at(b"\r\n")

    def end(self) -> None:
        if not self.at_end():
            raise self.error("Unexpected extra arguments" if self.peek() == 0x20 else "Invalid arguments")

    def match(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        m = pattern.match(self.data, self.pos)
        if m is None:
            raise self.error(f"Expected {what}")
        self.pos = m.end()
        return m.group()

    def atom(self) -> bytes:
        return self.match(_ATOM, "atom")

    def keyword(self) -> str:
        return self.atom().decode("ascii").upper()

    def open_paren(self) -> None:
        self.expect(b"(", "(")
        self.depth += 1
        if self.depth > self.max_depth:
            raise self.error("Too deeply nested")

    def close_paren(self) -> None:
        self.expect(b")", ")")
        self.depth -= 1

    def number(self, maximum: int = MAX_NUMBER, nonzero: bool = False) -> int:
        digits = self.match(_DIGITS, "number")
        if len(digits) > 19 or int(digits) > maximum or (nonzero and int(digits) == 0):
            raise self.error("Number out of range")
        return int(digits)

    # -- strings ----------------------------------------------------------------------------

    def quoted(self) -> bytes:
        # RFC 9051 §9: quoted = DQUOTE *QUOTED-CHAR DQUOTE; 8-bit accepted (utf8-quoted, §9)
        self.expect(b'"', "quoted string")
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise self.error("Unterminated quoted string")
            c = data[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(data) or data[self.pos] not in (0x22, 0x5C):
                    raise self.error("Invalid escape in quoted string")
                out.append(data[self.pos])
                self.pos += 1
            elif c in (0x00, 0x0A, 0x0D):
                raise self.error("Invalid character in quoted string")
            else:
                out.append(c)

    def literal(self, allow8: bool = False, allow_nul: bool = False) -> tuple[bytes, bool]:
        """Returns (content, is_literal8)."""
        value, binary = self.message_literal(allow8, allow_nul)
        if not isinstance(value, bytes):
            raise self.error("Literal too large here", code="TOOBIG")
        return value, binary

    def message_literal(self, allow8: bool = False, allow_nul: bool = False) -> tuple[bytes | SpooledLiteral, bool]:
        """A literal that may have been spooled to a file by the reader (APPEND's messages)."""
        m = _LITERAL.match(self.data, self.pos)
        if m is None:
            raise self.error("Expected literal")
        binary = bool(m.group(1))
        if binary and not allow8:
            raise self.error("literal8 not allowed here")
        size = int(m.group(2))
        start = m.end()
        spooled = self.spooled.get(start)
        if spooled is not None:  # its octets went to a file (NUL is checked by the server's store)
            self.pos = start
            return spooled, binary
        if start + size > len(self.data):
            raise self.error("Truncated literal")
        value = self.data[start : start + size]
        if not allow_nul and not binary and b"\x00" in value:
            raise self.error("NUL in literal")
        self.pos = start + size
        return value, binary

    def at_string(self) -> bool:
        return self.peek() in (0x22, 0x7B) or self.at(b"~{")

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B or self.at(b"~{"):
            return self.literal()[0]
        raise self.error("Expected string")

    def astring(self) -> bytes:
        if self.at_string():
            return self.string()
        return self.match(_ASTRING, "astring")

    def nstring(self) -> bytes | None:
        if self.at_ci(b"NIL") and not _ASTRING.match(self.data, self.pos + 3):
            self.pos += 3
            return None
        return self.string()

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"Invalid UTF-8 in {what}") from None

    # -- mailbox names ----------------------------------------------------------------------

    def decode_mailbox(self, raw: bytes, inbox: bool = True) -> str:
        if self.utf8:
            # RFC 9051 §5.1 / RFC 6855 §3: names are UTF-8 once IMAP4rev2 or UTF8=ACCEPT is on
            name = self.text(raw, "mailbox name")
        else:
            try:
                name = mutf7_decode(raw)  # RFC 3501 §5.1.3
            except Mutf7Error:  # a well-formed string that names no mailbox: NO, not BAD
                raise self.error("Mailbox name is not valid modified UTF-7", code="CANNOT", status="NO") from None
        if any(ch < " " or ch == "\x7f" for ch in name):
            raise self.error("Control character in mailbox name", code="CANNOT", status="NO")
        if inbox and name.upper() == "INBOX":
            return "INBOX"  # RFC 9051 §5.1: INBOX is case-insensitive
        return name

    def mailbox(self) -> str:
        return self.decode_mailbox(self.astring())

    def list_mailbox(self) -> str:
        raw = self.string() if self.at_string() else self.match(_LIST_CHARS, "mailbox pattern")
        return self.decode_mailbox(raw, inbox=False)

    # -- flags, dates, sets ---------------------------------------------------------------

    def flag(self, allow_recent: bool = False) -> str:
        if self.at(b"\\"):
            self.pos += 1
            name = "\\" + self.atom().decode("ascii")
            canon = _SYSTEM_FLAGS.get(name.upper())
            if canon is not None:
                if canon == "\\Recent" and not allow_recent:
                    raise self.error("\\Recent cannot be set")
                return canon
            return name  # flag-extension
        return self.atom().decode("ascii")  # flag-keyword

    def flag_list(self) -> tuple[str, ...]:
        self.open_paren()
        flags: list[str] = []
        if not self.at(b")"):
            flags.append(self.flag())
            while self.at(b" "):
                self.pos += 1
                flags.append(self.flag())
        self.close_paren()
        return tuple(flags)

    def seqset(self) -> SequenceSet:
        raw = self.match(_SEQSET, "sequence set")
        try:
            return SequenceSet.parse(raw)
        except ParseError as exc:
            raise self.error(exc.message) from None

    def date(self) -> dt.date:
        quoted = self.at(b'"')
        raw = self.quoted() if quoted else self.match(_ATOM, "date")
        try:
            return parse_date(raw)
        except ValueError:
            raise self.error("Invalid date") from None

    def date_time(self) -> dt.datetime:
        raw = self.quoted()
        try:
            return parse_date_time(raw)
        except ValueError:
            raise self.error("Invalid date-time") from None

    def charset_decode(self, raw: bytes, charset: str | None) -> str:
        return raw.decode(_python_codec(charset) if charset else "utf-8", "replace")


def parse_date(raw: bytes) -> dt.date:
    """RFC 9051 §9 date-text ``1-Feb-2024`` -> date; ValueError if malformed."""
    parts = raw.decode("ascii", "replace").split("-")
    if len(parts) != 3 or not 1 <= len(parts[0]) <= 2 or len(parts[2]) != 4:
        raise ValueError("bad date")
    day, month, year = parts
    if not (day.isdigit() and year.isdigit() and month.upper() in _MONTHS):
        raise ValueError("bad date")
    return dt.date(int(year), _MONTHS[month.upper()], int(day))


_DATE_TIME = re.compile(rb"( \d|\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


def parse_date_time(raw: bytes) -> dt.datetime:
    """RFC 9051 §9 date-time content ``17-Jul-1996 02:44:25 -0700`` -> aware datetime."""
    m = _DATE_TIME.fullmatch(raw)
    if m is None or m.group(2).upper().decode() not in _MONTHS:
        raise ValueError("bad date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    offset = dt.timedelta(hours=int(zh), minutes=int(zm))
    if offset >= dt.timedelta(hours=24) or int(zm) >= 60:
        raise ValueError("bad zone")
    tz = dt.timezone(-offset if sign == b"-" else offset)
    return dt.datetime(int(year), _MONTHS[mon.upper().decode()], int(day.strip()), int(hh), int(mm),
                       int(ss), tzinfo=tz)


def _python_codec(charset: str) -> str:
    name = "ascii" if charset.upper() in ("US-ASCII", "ASCII") else charset
    return codecs.lookup(name).name


# -- commands ----------------------------------------------------------------------------------

type _Handler = Callable[[_Scanner, str, bool], Command]


def _no_args(cls: type[Command]) -> _Handler:
    def handler(s: _Scanner, tag: str, uid: bool) -> Command:
        s.end()
        return cls(tag=tag)

    return handler


def _authenticate(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    mech = s.keyword()
    initial: bytes | None = None
    if s.at(b" "):
        s.sp()
        if s.at(b"=") and s.pos + 3 == len(s.data):
            s.pos += 1
            initial = b""  # RFC 4959 §3: "=" is an empty initial response
        else:
            raw = s.match(re.compile(rb"[A-Za-z0-9+/]+=*"), "base64 initial response")
            try:
                initial = base64.b64decode(raw, validate=True)
            except binascii.Error:
                raise s.error("Invalid base64 initial response") from None
    s.end()
    return Authenticate(tag=tag, mechanism=mech, initial_response=initial)


def _login(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    user = s.text(s.astring(), "user name")
    s.sp()
    password = s.text(s.astring(), "password")
    s.end()
    return Login(tag=tag, userid=user, password=password)


def _enable(s: _Scanner, tag: str, uid: bool) -> Command:
    caps: list[str] = []
    while s.at(b" "):
        s.sp()
        caps.append(s.keyword())
    if not caps:
        raise s.error("ENABLE needs at least one capability")
    s.end()
    return Enable(tag=tag, capabilities=tuple(caps))


def _select(cls: type[Select]) -> _Handler:
    def handler(s: _Scanner, tag: str, uid: bool) -> Command:
        s.sp()
        mailbox = s.mailbox()
        condstore = False
        qresync: QResync | None = None
        if s.at(b" "):
            s.sp()
            s.open_paren()
            while True:
                param = s.keyword()
                if param == "CONDSTORE":  # RFC 7162 §3.1.8
                    condstore = True
                elif param == "QRESYNC" and qresync is None:  # RFC 7162 §3.2.5
                    qresync = _qresync_params(s)
                else:
                    raise s.error(f"Unknown SELECT parameter {param}")
                if s.at(b")"):
                    break
                s.sp()
            s.close_paren()
        s.end()
        return cls(tag=tag, mailbox=mailbox, condstore=condstore, qresync=qresync)

    return handler


def _qresync_params(s: _Scanner) -> QResync:
    s.sp()
    s.open_paren()
    uidvalidity = s.number(nonzero=True)
    s.sp()
    modseq = s.number(MAX_NUMBER64, nonzero=True)
    known_uids = known_seqs = known_seq_uids = None
    if s.at(b" ") and not s.at(b" ("):
        s.sp()
        known_uids = s.seqset()
    if s.at(b" ("):
        s.sp()
        s.open_paren()
        known_seqs = s.seqset()
        s.sp()
        known_seq_uids = s.seqset()
        s.close_paren()
    s.close_paren()
    return QResync(uidvalidity, modseq, known_uids, known_seqs, known_seq_uids)


def _create(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    mailbox = s.mailbox()
    uses: list[str] = []
    if s.at(b" "):
        # RFC 6154 §3 / RFC 4466 create-params: (USE (\Drafts \Sent))
        s.sp()
        s.open_paren()
        while True:
            if s.keyword() != "USE":
                raise s.error("Unknown CREATE parameter")
            s.sp()
            s.open_paren()
            if not s.at(b")"):
                uses.append(_use_attr(s))
                while s.at(b" "):
                    s.sp()
                    uses.append(_use_attr(s))
            s.close_paren()
            if s.at(b")"):
                break
            s.sp()
        s.close_paren()
    s.end()
    return Create(tag=tag, mailbox=mailbox, special_use=tuple(uses))


def _use_attr(s: _Scanner) -> str:
    s.expect(b"\\", "special-use attribute")
    return "\\" + s.atom().decode("ascii")


def _one_mailbox(cls: type[Delete] | type[Subscribe] | type[Unsubscribe]) -> _Handler:
    def handler(s: _Scanner, tag: str, uid: bool) -> Command:
        s.sp()
        mailbox = s.mailbox()
        s.end()
        return cls(tag=tag, mailbox=mailbox)

    return handler


def _rename(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    old = s.mailbox()
    s.sp()
    new = s.mailbox()
    s.end()
    return Rename(tag=tag, mailbox=old, new_mailbox=new)


def _list(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    extended = False
    selection: set[str] = set()
    if s.at(b"("):  # RFC 5258 §3.1 list-select-opts
        extended = True
        s.open_paren()
        while not s.at(b")"):
            if selection:
                s.sp()
            opt = s.keyword()
            if opt not in _LIST_SELECT:
                raise s.error(f"Unknown LIST selection option {opt}")
            selection.add(opt)
        s.close_paren()
        if "RECURSIVEMATCH" in selection and not selection - {"RECURSIVEMATCH", "REMOTE"}:
            raise s.error("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3.1
        s.sp()
    reference = s.decode_mailbox(s.astring(), inbox=False)
    s.sp()
    patterns: list[str] = []
    if s.at(b"("):  # RFC 5258 §3 patterns
        extended = True
        s.open_paren()
        patterns.append(s.list_mailbox())
        while s.at(b" "):
            s.sp()
            patterns.append(s.list_mailbox())
        s.close_paren()
    else:
        patterns.append(s.list_mailbox())
    returns = ListReturn()
    if s.at(b" "):
        extended = True
        s.sp()
        if s.keyword() != "RETURN":
            raise s.error("Expected RETURN")
        s.sp()
        returns = _list_return(s)
    s.end()
    return List(tag=tag, reference=reference, patterns=tuple(patterns), selection=frozenset(selection),
                returns=returns, extended=extended)


def _list_return(s: _Scanner) -> ListReturn:
    subscribed = children = special_use = False
    status: tuple[str, ...] | None = None
    s.open_paren()
    first = True
    while not s.at(b")"):
        if not first:
            s.sp()
        first = False
        opt = s.keyword()
        if opt == "SUBSCRIBED":
            subscribed = True
        elif opt == "CHILDREN":
            children = True
        elif opt == "SPECIAL-USE":
            special_use = True
        elif opt == "STATUS":  # RFC 5819 §2
            s.sp()
            status = _status_items(s)
        else:
            raise s.error(f"Unknown LIST return option {opt}")
    s.close_paren()
    return ListReturn(subscribed, children, special_use, status)


def _lsub(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    reference = s.decode_mailbox(s.astring(), inbox=False)
    s.sp()
    pattern = s.list_mailbox()
    s.end()
    return Lsub(tag=tag, reference=reference, pattern=pattern)


def _status_items(s: _Scanner) -> tuple[str, ...]:
    s.open_paren()
    items = [s.keyword()]
    while s.at(b" "):
        s.sp()
        items.append(s.keyword())
    s.close_paren()
    for item in items:
        if item not in STATUS_ITEMS:
            raise s.error(f"Unknown STATUS item {item}")
    return tuple(dict.fromkeys(items))


def _status(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    mailbox = s.mailbox()
    s.sp()
    items = _status_items(s)
    s.end()
    return Status(tag=tag, mailbox=mailbox, items=items)


def _append(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    mailbox = s.mailbox()
    messages = [_append_message(s)]
    while s.at(b" "):  # RFC 3502 §6: MULTIAPPEND, 1*append-message
        messages.append(_append_message(s))
    s.end()
    first = messages[0]
    return Append(tag=tag, mailbox=mailbox, flags=first.flags, internal_date=first.internal_date,
                  message=first.message, binary=first.binary, catenate=first.catenate, utf8=first.utf8,
                  more=tuple(messages[1:]))


def _append_message(s: _Scanner) -> AppendMessage:
    """SP [flag-list SP] [date-time SP] append-data (RFC 3502 §6, RFC 4466 §2.3)."""
    s.sp()
    flags: tuple[str, ...] = ()
    when: dt.datetime | None = None
    if s.at(b"("):
        flags = s.flag_list()
        s.sp()
    if s.at(b'"'):
        when = s.date_time()
        s.sp()
    if s.at_ci(b"CATENATE "):  # RFC 4469 §5
        s.pos += len(b"CATENATE ")
        return AppendMessage(flags, when, catenate=_catenate(s))
    if s.at_ci(b"UTF8 "):  # RFC 6855 §4 utf8-literal
        s.pos += len(b"UTF8 ")
        message = _utf8_literal(s)
        return AppendMessage(flags, when, message, binary=True, utf8=True)
    if not (s.at(b"{") or s.at(b"~{")):
        raise s.error("APPEND needs the message as a literal")
    message, binary = s.message_literal(allow8=True, allow_nul=True)  # RFC 3516 §4.4 literal8
    return AppendMessage(flags, when, message, binary)


#: Parts of one CATENATE: each URL part makes the server read a stored message.
MAX_CATENATE_PARTS = 100


def _utf8_literal(s: _Scanner) -> bytes | SpooledLiteral:
    """RFC 6855 §4: "UTF8" SP "(" literal8 ")" (the word already consumed)."""
    s.open_paren()
    if not s.at(b"~{"):
        raise s.error("UTF8 needs a literal8")
    message, _binary = s.message_literal(allow8=True, allow_nul=True)
    s.close_paren()
    return message


def _catenate(s: _Scanner) -> tuple[CatPart, ...]:
    """RFC 4469 §5: "(" cat-part *(SP cat-part) ")"; cat-part = "TEXT" SP literal / "URL" SP astring
    (RFC 6855 §4 adds "UTF8" SP "(" literal8 ")")."""
    s.open_paren()
    parts: list[CatPart] = []
    while True:
        word = s.keyword()
        s.sp()
        if word == "TEXT":
            data, _binary = s.message_literal(allow8=True, allow_nul=True)
            parts.append(CatPart("TEXT", data))
        elif word == "UTF8":
            parts.append(CatPart("TEXT", _utf8_literal(s)))
        elif word == "URL":
            url = s.astring()
            try:
                parts.append(CatPart("URL", url=url.decode("ascii")))  # RFC 5092: URLs are ASCII
            except UnicodeDecodeError:
                raise s.error("URL must be ASCII") from None
        else:
            raise s.error("CATENATE part must be TEXT or URL")
        if not s.at(b" "):
            break
        if len(parts) >= MAX_CATENATE_PARTS:
            raise s.error(f"At most {MAX_CATENATE_PARTS} CATENATE parts", code="LIMIT", status="NO")
        s.sp()
    s.close_paren()
    return tuple(parts)


def _expunge(s: _Scanner, tag: str, uid: bool) -> Command:
    if uid:  # RFC 4315 §2.1 UID EXPUNGE sequence-set
        s.sp()
        seqset = s.seqset()
        s.end()
        return Expunge(tag=tag, uid=True, sequence_set=seqset)
    s.end()
    return Expunge(tag=tag)


def _copy_move(cls: type[Copy] | type[Move]) -> _Handler:
    def handler(s: _Scanner, tag: str, uid: bool) -> Command:
        s.sp()
        seqset = s.seqset()
        s.sp()
        mailbox = s.mailbox()
        s.end()
        return cls(tag=tag, uid=uid, sequence_set=seqset, mailbox=mailbox)

    return handler


def _store(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    seqset = s.seqset()
    s.sp()
    unchangedsince: int | None = None
    if s.at(b"("):  # RFC 7162 §3.1.3 store-modifier
        s.open_paren()
        if s.keyword() != "UNCHANGEDSINCE":
            raise s.error("Unknown STORE modifier")
        s.sp()
        unchangedsince = s.number(MAX_NUMBER64)
        s.close_paren()
        s.sp()
    item = s.keyword()
    silent = item.endswith(".SILENT")
    base = item.removesuffix(".SILENT")
    try:
        mode = StoreMode(base)
    except ValueError:
        raise s.error("Expected FLAGS, +FLAGS or -FLAGS") from None
    s.sp()
    if s.at(b"("):
        flags = s.flag_list()
    else:
        found = [s.flag()]
        while s.at(b" "):
            s.sp()
            found.append(s.flag())
        flags = tuple(found)
    s.end()
    return Store(tag=tag, uid=uid, sequence_set=seqset, mode=mode, silent=silent, flags=flags,
                 unchangedsince=unchangedsince)


def _id(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    if s.at_ci(b"NIL"):
        s.pos += 3
        s.end()
        return Id(tag=tag, params=None)
    s.open_paren()
    params: list[tuple[str, str | None]] = []
    while not s.at(b")"):
        if params:
            s.sp()
        key = s.string().decode("utf-8", "replace")
        s.sp()
        value = s.nstring()
        params.append((key, None if value is None else value.decode("utf-8", "replace")))
        if len(params) > 64:  # RFC 2971 §3.3 allows 30
            raise s.error("Too many ID parameters")
    s.close_paren()
    s.end()
    return Id(tag=tag, params=tuple(params))


# -- FETCH --------------------------------------------------------------------------------------

def _fetch(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    seqset = s.seqset()
    s.sp()
    attrs: list[FetchAttr] = []
    if s.at(b"("):
        s.open_paren()
        attrs.extend(_fetch_att(s))
        while s.at(b" "):
            s.sp()
            attrs.extend(_fetch_att(s))
        s.close_paren()
    else:
        word = s.data[s.pos : s.pos + 5].upper()
        macro = next((m for m in _MACROS if word.startswith(m.encode())), None)
        if macro and not _FETCH_NAME.match(s.data, s.pos + len(macro)):
            s.pos += len(macro)
            attrs.extend(FetchAttr(n) for n in _MACROS[macro])
        else:
            attrs.extend(_fetch_att(s))
    changedsince: int | None = None
    vanished = False
    if s.at(b" "):  # RFC 7162 §3.1.4 / §3.2.6 fetch-modifiers
        s.sp()
        s.open_paren()
        while True:
            mod = s.keyword()
            if mod == "CHANGEDSINCE":
                s.sp()
                changedsince = s.number(MAX_NUMBER64)
            elif mod == "VANISHED":
                vanished = True
            else:
                raise s.error(f"Unknown FETCH modifier {mod}")
            if s.at(b")"):
                break
            s.sp()
        s.close_paren()
        if vanished and (not uid or changedsince is None):
            raise s.error("VANISHED needs UID FETCH and CHANGEDSINCE")  # RFC 7162 §3.2.6
    s.end()
    return Fetch(tag=tag, uid=uid, sequence_set=seqset, attributes=tuple(attrs),
                 changedsince=changedsince, vanished=vanished)


def _fetch_att(s: _Scanner) -> list[FetchAttr]:
    name = s.match(_FETCH_NAME, "fetch attribute").decode("ascii").upper()
    if s.at(b"["):
        if name in ("BODY", "BODY.PEEK"):
            section = _section(s)
            return [FetchAttr("BODY", section, _partial(s), peek=name == "BODY.PEEK")]
        if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):  # RFC 3516 §4.2
            section = _binary_section(s)
            partial = _partial(s) if name != "BINARY.SIZE" else None
            return [FetchAttr(name.removesuffix(".PEEK"), section, partial, peek=name == "BINARY.PEEK")]
        raise s.error(f"Unexpected section after {name}")
    if name in _SIMPLE_FETCH:
        return [FetchAttr(name)]
    if name in _MACROS:
        raise s.error(f"{name} must be used alone")
    raise s.error(f"Unknown FETCH attribute {name}")


_SECTION_TEXT = ("HEADER.FIELDS.NOT", "HEADER.FIELDS", "HEADER", "TEXT", "MIME")


def _section(s: _Scanner) -> Section:
    s.expect(b"[")
    part = _section_part(s)
    text: str | None = None
    fields: tuple[str, ...] = ()
    dotted = False
    if part and s.at(b"."):
        s.pos += 1
        dotted = True
    elif part and not s.at(b"]"):
        raise s.error("Invalid section")
    if dotted or not s.at(b"]"):
        text = next((t for t in _SECTION_TEXT if s.at_ci(t.encode())), None)
        if text is None or (text == "MIME" and not part):
            raise s.error("Invalid section")
        s.pos += len(text)
        if text.startswith("HEADER.FIELDS"):
            s.sp()
            fields = _header_list(s)
    s.expect(b"]")
    return Section(part, text, fields)


def parse_section(raw: bytes) -> Section:
    """A section-spec as inside BODY[...] (e.g. ``1.2.MIME``, ``HEADER.FIELDS (To)``), alone: for
    RFC 5092's ``;SECTION=`` of IMAP URLs. ParseError if it is not one."""
    data = b"[" + raw + b"]\r\n"
    s = _Scanner(data, False, DEFAULT_MAX_DEPTH)
    section = _section(s)
    s.end()
    return section


def _section_part(s: _Scanner) -> tuple[int, ...]:
    parts: list[int] = []
    while s.peek() in range(0x30, 0x3A):
        parts.append(s.number(nonzero=True))
        if len(parts) > 64:
            raise s.error("Section part too deep")
        if s.at(b".") and s.data[s.pos + 1 : s.pos + 2].isdigit():
            s.pos += 1
            continue
        break
    return tuple(parts)


def _binary_section(s: _Scanner) -> Section:
    s.expect(b"[")
    part = _section_part(s)
    s.expect(b"]", "] (BINARY takes a part number only)")
    return Section(part)


def _header_list(s: _Scanner) -> tuple[str, ...]:
    s.open_paren()
    names: list[str] = []
    while True:
        name = s.astring().decode("ascii", "replace")
        if not _FIELD_NAME.fullmatch(name):
            raise s.error("Invalid header field name")
        names.append(name.upper())
        if not s.at(b" "):
            break
        s.sp()
    s.close_paren()
    return tuple(names)


def _partial(s: _Scanner) -> tuple[int, int] | None:
    if not s.at(b"<"):
        return None
    s.pos += 1
    offset = s.number(MAX_NUMBER64)
    s.expect(b".")
    length = s.number(MAX_NUMBER64, nonzero=True)
    s.expect(b">")
    return offset, length


# -- SEARCH -------------------------------------------------------------------------------------

def _search(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    returns: tuple[str, ...] | None = None
    if s.at_ci(b"RETURN "):  # RFC 4731 §3
        returns, _partial = _return_options(s, _SEARCH_RETURN)
        s.sp()
    charset: str | None = None
    if s.at_ci(b"CHARSET "):
        s.pos += 8
        charset = _charset(s)
        s.sp()
    criteria = _search_criteria(s, charset)
    return Search(tag=tag, uid=uid, charset=charset, criteria=criteria, returns=returns)


def _return_options(s: _Scanner, allowed: frozenset[str]) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """``RETURN (opt ...)`` (RFC 4731 §3; PARTIAL low:high from RFC 5267 §4.4): the upper-cased
    options, ``()`` meaning ALL (RFC 4731 §3.1), and PARTIAL's range."""
    s.pos += 7  # "RETURN "
    s.open_paren()
    opts: list[str] = []
    partial: tuple[int, int] | None = None
    while not s.at(b")"):
        if opts:
            s.sp()
        opt = s.keyword()
        if opt not in allowed:
            raise s.error(f"Unknown return option {opt}")
        if opt == "PARTIAL":
            s.sp()
            low = s.number(nonzero=True)
            s.expect(b":")
            high = s.number(nonzero=True)
            partial = (min(low, high), max(low, high))
        opts.append(opt)
    s.close_paren()
    return tuple(dict.fromkeys(opts)) or ("ALL",), partial


def _charset(s: _Scanner, raw: bytes | None = None) -> str:
    """A search charset (read here, or ``raw`` already read) the server can decode, upper-cased,
    else NO [BADCHARSET] (RFC 9051 §6.4.4)."""
    charset = (s.astring() if raw is None else raw).decode("ascii", "replace").upper()
    try:
        codec = codecs.lookup(_python_codec(charset))
        if not getattr(codec, "_is_text_encoding", True):
            raise LookupError(charset)
    except LookupError:
        raise s.error("Unsupported charset", code="BADCHARSET", status="NO") from None
    return charset


def _search_criteria(s: _Scanner, charset: str | None) -> SearchKey:
    keys = [_search_key(s, charset)]
    while s.at(b" "):
        s.sp()
        keys.append(_search_key(s, charset))
    s.end()
    return keys[0] if len(keys) == 1 else AndKey(tuple(keys))


def _sort(s: _Scanner, tag: str, uid: bool) -> Command:
    """RFC 5256 §4 ``SORT [RETURN (...)] (criteria) charset search-key...`` (RETURN: RFC 5267)."""
    s.sp()
    returns: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None
    if s.at_ci(b"RETURN "):
        returns, partial = _return_options(s, _SORT_RETURN)
        s.sp()
    s.open_paren()
    program: list[SortCriterion] = []
    while not s.at(b")"):
        if program:
            s.sp()
        word = s.keyword()
        reverse = word == "REVERSE"
        if reverse:
            s.sp()
            word = s.keyword()
        if word not in SORT_KEYS:
            raise s.error(f"Unknown sort key {word}")
        program.append(SortCriterion(word, reverse))
    s.close_paren()
    if not program:
        raise s.error("Empty sort criteria")
    s.sp()
    raw = s.astring()
    s.sp()  # a missing search key is BAD before an unknown charset is NO
    charset = _charset(s, raw)
    return Sort(tag=tag, uid=uid, sort=tuple(program), charset=charset, criteria=_search_criteria(s, charset),
                returns=returns, partial=partial)


def _thread(s: _Scanner, tag: str, uid: bool) -> Command:
    """RFC 5256 §4 ``THREAD algorithm charset search-key...``."""
    s.sp()
    algorithm = s.keyword()
    if algorithm not in THREAD_ALGORITHMS:
        raise s.error(f"Unsupported threading algorithm {algorithm}")
    s.sp()
    raw = s.astring()
    s.sp()
    charset = _charset(s, raw)
    return Thread(tag=tag, uid=uid, algorithm=algorithm, charset=charset, criteria=_search_criteria(s, charset))


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True), "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True), "RECENT": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False),
    "OLD": ("\\Recent", False),
}
_HEADER_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT"})
_DATE_KEYS = {
    "BEFORE": ("INTERNAL", "BEFORE"), "ON": ("INTERNAL", "ON"), "SINCE": ("INTERNAL", "SINCE"),
    "SENTBEFORE": ("SENT", "BEFORE"), "SENTON": ("SENT", "ON"), "SENTSINCE": ("SENT", "SINCE"),
}


def _search_key(s: _Scanner, charset: str | None) -> SearchKey:
    c = s.peek()
    if c == 0x28:  # "(" search-key *(SP search-key) ")"
        s.open_paren()
        keys = [_search_key(s, charset)]
        while s.at(b" "):
            s.sp()
            keys.append(_search_key(s, charset))
        s.close_paren()
        return keys[0] if len(keys) == 1 else AndKey(tuple(keys))
    if c != -1 and c in b"0123456789*$":
        return SeqSetKey(s.seqset())
    word = s.keyword()
    if word == "ALL":
        return AllKey()
    if word in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[word]
        return FlagKey(flag, present)
    if word == "NEW":  # RFC 3501 §6.4.4: NEW is (RECENT UNSEEN)
        return AndKey((FlagKey("\\Recent"), FlagKey("\\Seen", False)))
    s.sp()
    if word in ("KEYWORD", "UNKEYWORD"):
        return FlagKey(s.flag(allow_recent=True), word == "KEYWORD")
    if word in _HEADER_KEYS:
        return HeaderKey(word, s.charset_decode(s.astring(), charset))
    if word in ("BODY", "TEXT"):
        return TextKey(word, s.charset_decode(s.astring(), charset))
    if word == "HEADER":
        name = s.astring().decode("ascii", "replace")
        if not _FIELD_NAME.fullmatch(name):
            raise s.error("Invalid header field name")
        s.sp()
        return HeaderKey(name.upper(), s.charset_decode(s.astring(), charset))
    if word in _DATE_KEYS:
        field, op = _DATE_KEYS[word]
        return DateKey(field, op, s.date())
    if word in ("LARGER", "SMALLER"):
        return SizeKey(word, s.number(MAX_NUMBER64))
    if word == "UID":
        return SeqSetKey(s.seqset(), uid=True)
    if word in ("OLDER", "YOUNGER"):  # RFC 5032 §2: interval in seconds
        return WithinKey(word, s.number(nonzero=True))
    if word == "NOT":
        s.depth += 1
        if s.depth > s.max_depth:
            raise s.error("Too deeply nested")
        key = _search_key(s, charset)
        s.depth -= 1
        return NotKey(key)
    if word == "OR":
        s.depth += 1
        if s.depth > s.max_depth:
            raise s.error("Too deeply nested")
        left = _search_key(s, charset)
        s.sp()
        right = _search_key(s, charset)
        s.depth -= 1
        return OrKey(left, right)
    if word == "MODSEQ":  # RFC 7162 §3.1.5
        entry_name = entry_type = None
        if s.at(b'"'):
            entry_name = s.quoted().decode("ascii", "replace")
            s.sp()
            entry_type = s.keyword().lower()
            if entry_type not in ("priv", "shared", "all"):
                raise s.error("Invalid MODSEQ entry type")
            s.sp()
        return ModSeqKey(s.number(MAX_NUMBER64), entry_name, entry_type)
    raise s.error(f"Unknown SEARCH key {word}")


# -- QUOTA (RFC 9208 §4.1) -----------------------------------------------------------------------

def _getquota(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    root = s.text(s.astring(), "quota root")  # RFC 9208 §8: quota-root-name = astring
    s.end()
    return GetQuota(tag=tag, root=root)


def _getquotaroot(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    mailbox = s.mailbox()
    s.end()
    return GetQuotaRoot(tag=tag, mailbox=mailbox)


def _setquota(s: _Scanner, tag: str, uid: bool) -> Command:
    # RFC 9208 §8: setquota = "SETQUOTA" SP quota-root-name SP setquota-list;
    # setquota-list = "(" [setquota-resource *(SP setquota-resource)] ")"
    s.sp()
    root = s.text(s.astring(), "quota root")
    s.sp()
    s.open_paren()
    limits: list[tuple[str, int]] = []
    while not s.at(b")"):
        if limits:
            s.sp()
        resource = s.keyword()
        s.sp()
        limits.append((resource, s.number(MAX_NUMBER64)))
        if len(limits) > 32:
            raise s.error("Too many quota resources")
    s.close_paren()
    s.end()
    return SetQuota(tag=tag, root=root, limits=tuple(limits))
# -- NOTIFY (RFC 5465 §8) -----------------------------------------------------------------------

_NOTIFY_FILTERS = frozenset({"SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL", "SUBSCRIBED", "SUBTREE",
                             "MAILBOXES"})
_FILTER_NAME = re.compile(rb"[A-Za-z-]+")


def _notify(s: _Scanner, tag: str, uid: bool) -> Command:
    s.sp()
    word = s.keyword()
    if word == "NONE":
        s.end()
        return Notify(tag=tag, none=True)
    if word != "SET":
        raise s.error("NOTIFY needs SET or NONE")
    s.sp()
    status = False
    if s.at_ci(b"STATUS "):
        s.pos += len(b"STATUS ")
        status = True
    groups = [_notify_group(s)]
    while s.at(b" "):
        s.sp()
        groups.append(_notify_group(s))
    s.end()
    return Notify(tag=tag, status=status, groups=tuple(groups))


def _notify_group(s: _Scanner) -> NotifyGroup:
    """"(" filter-mailboxes SP events ")"."""
    s.open_paren()
    flt = s.match(_FILTER_NAME, "mailbox filter").decode("ascii").upper()
    if flt not in _NOTIFY_FILTERS:
        raise s.error(f"Unknown NOTIFY filter {flt}")
    mailboxes: tuple[str, ...] = ()
    if flt in ("SUBTREE", "MAILBOXES"):  # one-or-more-mailbox
        s.sp()
        if s.at(b"("):
            s.open_paren()
            names = [s.mailbox()]
            while s.at(b" "):
                s.sp()
                names.append(s.mailbox())
            s.close_paren()
        else:
            names = [s.mailbox()]
        mailboxes = tuple(names)
    s.sp()
    events: list[str] = []
    fetch: list[FetchAttr] = []
    if s.at_ci(b"NONE"):
        s.pos += 4
    else:
        s.open_paren()
        while True:
            ev = s.atom().decode("ascii")
            events.append(ev)
            if ev.upper() == "MESSAGENEW" and s.at(b" ("):  # RFC 5465 §5.2 fetch-att
                s.sp()
                s.open_paren()
                fetch.extend(_fetch_att(s))
                while s.at(b" "):
                    s.sp()
                    fetch.extend(_fetch_att(s))
                s.close_paren()
            if not s.at(b" "):
                break
            s.sp()
        s.close_paren()
    s.close_paren()
    return NotifyGroup(flt, mailboxes, tuple(events), tuple(fetch))


# -- dispatch -----------------------------------------------------------------------------------

_COMMANDS: dict[str, _Handler] = {
    "CAPABILITY": _no_args(Capability),
    "NOOP": _no_args(Noop),
    "LOGOUT": _no_args(Logout),
    "STARTTLS": _no_args(StartTLS),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "SELECT": _select(Select),
    "EXAMINE": _select(Examine),
    "CREATE": _create,
    "DELETE": _one_mailbox(Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _one_mailbox(Subscribe),
    "UNSUBSCRIBE": _one_mailbox(Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "NAMESPACE": _no_args(Namespace),
    "STATUS": _status,
    "APPEND": _append,
    "IDLE": _no_args(Idle),
    "CHECK": _no_args(Check),
    "CLOSE": _no_args(Close),
    "UNSELECT": _no_args(Unselect),
    "EXPUNGE": _expunge,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy_move(Copy),
    "MOVE": _copy_move(Move),
    "ID": _id,
    "SORT": _sort,  # RFC 5256
    "NOTIFY": _notify,  # RFC 5465
    "THREAD": _thread,
    "GETQUOTA": _getquota,  # RFC 9208
    "GETQUOTAROOT": _getquotaroot,
    "SETQUOTA": _setquota,
}
_UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE", "SORT", "THREAD"})  # RFC 9051 §6.4.9


def read_tag(data: bytes) -> str | None:
    """The tag at the start of a command line, or None if it does not start with a valid one."""
    m = _TAG.match(data)
    if m is None or not data.startswith(b" ", m.end()):
        return None
    return m.group().decode("ascii")


def parse_command(data: bytes, *, utf8: bool = False, max_depth: int = DEFAULT_MAX_DEPTH,
                  spooled: Mapping[int, SpooledLiteral] | None = None) -> Command:
    """Parse one framed command (ending in CRLF, literals inline) or raise ParseError.

    ``utf8`` selects mailbox-name decoding: False for IMAP4rev1 (modified UTF-7), True once the
    session has enabled IMAP4rev2 or UTF8=ACCEPT. ``spooled``: literals the reader wrote to files,
    by the offset in ``data`` where their octets would have been (only APPEND's messages may be).
    """
    s = _Scanner(data, utf8, max_depth, spooled)
    if not data.endswith(b"\r\n"):
        raise s.error("Command not terminated by CRLF")
    tag = read_tag(data)
    if tag is None:
        raise s.error("Missing or invalid tag")
    s.tag = tag
    s.pos = len(tag) + 1
    m = _ATOM.match(data, s.pos)
    if m is None:
        raise s.error("Missing command")
    name = m.group().decode("ascii").upper()
    s.pos = m.end()
    uid = False
    if name == "UID":
        s.sp()
        name = s.keyword()
        if name not in _UID_COMMANDS:
            raise s.error(f"Unknown UID command {name}")
        uid = True
    handler = _COMMANDS.get(name)
    if handler is None:
        raise s.error("Unknown command")
    try:
        return handler(s, tag, uid)
    except RecursionError:
        raise s.error("Too deeply nested") from None
