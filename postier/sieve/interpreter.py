"""Sieve interpreter (RFC 5228 §2.10, §4, §5 and the extensions in ``validate.CAPABILITIES``): a validated
script, a message and its envelope in, an action list out; pure, with every resource bounded.

Bounds (``Limits``): steps (each command, test and compared value costs one; the CPU budget), actions,
redirects, include depth and count, variables and their size, match values, header edits and the body
size searched. Exceeding one is a runtime error; a runtime error keeps the message (RFC 5228 §2.10.6:
implicit keep), so ``Result.final()`` never loses mail. Stores (mailbox existence, duplicate tracking,
included scripts) are small callables in ``Environment``; nothing here touches the disk or the clock.

A message is its header section (held, editable) over a body that stays where it is, read by offset
(``Message.at``: a spooled file); only a body test reads it, and what delivery stores or sends is a
``Copy`` (trace fields, the header as edited, the original body) read in pieces. A body test reads a
message up to ``WHOLE`` (MEMORY_DATA_LIMIT, 1 MiB) whole. Above, RFC 5173 §8 asks that body tests
not burden the server, and what they examine is bounded: :raw the first ``max_body`` octets of the
body (as for any message); :text and :content the MIME tree of textscan's reduced copy (at most
TEXT_LIMIT octets, the bodies the test does not read left out), or the first TEXT_LIMIT octets of
the message parsed when the copy cannot serve (a text part beyond TEXT_LIMIT, :content naming an
attachment's type); each part decoded from at most its first 2 × ``max_body`` octets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.header import Header
from email.utils import parsedate_tz

from postier import __version__
from postier.message.envelope import MISSING_DOMAIN, parse_addresses
from postier.proto.crlf import to_crlf
from postier.proto.smtp.address import parse_path
from postier.proto.smtp.errors import AddressError
from postier.message.matching import TEXT_LIMIT
from postier.message.mime import (
    Part, UnknownCTE, decode_body, decode_header_text, decode_transfer_encoding, header_end, parse_message,
)
from postier.message.textscan import PIECE, ReadAt, sparse_part
from postier.message.types import MEMORY_DATA_LIMIT

from .match import MatchError, MatchTimeout, compare_relational, match_value
from .validate import Node, Script

__all__ = [
    "WHOLE", "Action", "Copy", "chained", "Environment", "Interpreter", "Limits", "Message", "Result", "SieveRuntimeError",
    "parse_address",
]


class SieveRuntimeError(Exception):
    """A script that failed while running; its actions are dropped for an implicit keep."""


class _Stop(Exception):
    pass


class _Return(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Limits:
    max_steps: int = 200_000
    max_actions: int = 32
    max_redirects: int = 4
    max_include_depth: int = 10
    max_includes: int = 255
    max_variables: int = 255  # RFC 5229 §6 asks for at least 128
    max_variable_size: int = 4096
    max_match_values: int = 33  # ${0}..${32}
    max_header_edits: int = 1000
    max_header_size: int = 2048
    max_body: int = 1 << 20
    max_match_seconds: float = 2.0  # all :matches/:regex searches of one run together


# -- message -------------------------------------------------------------------------------------

def chained(first: bytes, then: ReadAt, at: int = 0) -> ReadAt:
    """`first` followed by what `then` reads from offset `at` on, read by offset as one message (a
    header before a body that stays in its file; a `ReadAt` gives fewer octets only at its end)."""
    def read_at(offset: int, n: int) -> bytes:
        out = first[offset:offset + n]
        if len(out) < n:
            out += then(at + max(0, offset - len(first)), n - len(out))
        return out
    return read_at


WHOLE = MEMORY_DATA_LIMIT  # a body test reads a message up to this size whole, a larger one bounded
_HEAD_PIECE = 64 << 10  # octets read at a time looking for the end of the header section


class Message:
    """The message a script sees: an editable header (RFC 5293) over the original body, which stays
    where it is (bytes, or a spooled file read by offset) and is read only by a body test.

    `Message(raw)` takes the octets; `Message.at` reads the header section of a message in a file
    and nothing else. The body test (RFC 5173) reads a message up to `WHOLE` octets whole, a larger
    one through `body_tree`'s bounded copy. Delivery copies it through `Copy` in pieces.
    """

    def __init__(self, raw: bytes) -> None:
        raw = to_crlf(raw)
        self._setup(raw, lambda offset, n: raw[offset:offset + n], len(raw))

    @classmethod
    def at(cls, read_at: ReadAt, size: int, head_limit: int) -> Message:
        """The message of `size` octets read by offset (CRLF line ends, as SMTP and LMTP give them):
        its header section is read, a piece at a time, and held; ValueError when it does not end
        within `head_limit` octets (the pipelines refuse such a message before it gets here)."""
        head = b""
        while header_end(head) < 0 and len(head) < min(size, head_limit):
            piece = read_at(len(head), min(_HEAD_PIECE, size - len(head)))
            if not piece:
                raise ValueError("message file ended early")
            head += piece
        end = header_end(head)
        if end < 0 and size > len(head):
            raise ValueError(f"header section longer than {head_limit} octets")
        m = cls.__new__(cls)
        m._setup(head[:end] if end >= 0 else head, read_at, size)
        return m

    def _setup(self, head: bytes, read_at: ReadAt, size: int) -> None:
        root = parse_message(head)
        self.fields: list[tuple[str, bytes]] = [(f.name, f.value) for f in root.fields]
        self.has_blank = root.has_blank  # RFC 5173 §4: without the blank line there is no body
        self._original = head[:root.header_end]  # the fields as received, up to the blank line
        self._read_at = read_at
        self._size = size
        self._part: Part | None = root if len(head) == size else None  # read whole already
        self.edited = False

    @property
    def original_head(self) -> bytes:
        """The header fields as received, without the blank line."""
        return self._original

    @property
    def head(self) -> bytes:
        """The header fields as they are now (edited or not), without the blank line."""
        if not self.edited:
            return self._original
        return b"".join(n.encode("utf-8", "replace") + b":" + v + b"\r\n" for n, v in self.fields)

    @property
    def size(self) -> int:
        """RFC 5228 §5.9: the message's size in octets, as it is now."""
        return self.size_with(self.head)

    def size_with(self, head: bytes) -> int:
        """The size of the message with `head` for its fields."""
        return self._size - len(self._original) + len(head)

    def read_at(self, offset: int, n: int, head: bytes | None = None) -> bytes:
        """Up to `n` octets from `offset` of the message as it is now, or with `head` for its fields."""
        return chained(self.head if head is None else head, self._read_at, len(self._original))(offset, n)

    @property
    def raw(self) -> bytes:
        """The whole message as it is now (read whole: small messages and tests)."""
        return self.read_at(0, self.size)

    @property
    def part(self) -> Part:
        """The whole message parsed (read whole: for a message up to `WHOLE` octets)."""
        if self._part is None:
            self._part = parse_message(self.raw)
        return self._part

    def raw_body(self, limit: int) -> bytes:
        """RFC 5173 §5.1: the first `limit` octets of the body, undecoded."""
        start = len(self.head) + 2
        return self.read_at(start, min(limit, self.size - start)) if self.has_blank else b""

    def body_tree(self, unread: Callable[[Part], bool]) -> Part:
        """The MIME tree a body test walks: the whole message's up to `WHOLE` octets; above, the
        bounded copy of `textscan.sparse_part`, whose left-out places all lie in bodies the test
        does not read (`unread`: a leaf part's body), else the first TEXT_LIMIT octets parsed."""
        size = self.size
        if size <= WHOLE:
            return self.part
        tree = sparse_part(self.read_at, size, unread, TEXT_LIMIT)  # RFC 5173 §8: bounded
        return tree if tree is not None else parse_message(self.read_at(0, TEXT_LIMIT))

    def values(self, name: str) -> list[bytes]:
        lname = name.lower()
        return [v.replace(b"\r\n", b"").strip(b" \t") for n, v in self.fields if n.lower() == lname]

    def add(self, name: str, value: bytes, last: bool) -> None:
        self._part = None
        self.edited = True
        if last:
            self.fields.append((name, value))
        else:
            self.fields.insert(0, (name, value))

    def delete(self, indexes: set[int]) -> None:
        self._part = None
        self.edited = True
        self.fields = [f for i, f in enumerate(self.fields) if i not in indexes]


@dataclass(frozen=True, slots=True)
class Copy:
    """A copy of the message to store or send: `trace` (fields put before it: a redirect's), then
    `head` (its header fields as edited; None: as received), then the original's blank line and
    body. Read in pieces (`pieces`) or by offset; joined only by `bytes()` (small messages, tests)."""

    message: Message
    head: bytes | None = None
    trace: bytes = b""

    @property
    def original(self) -> bool:
        """Whether it is the message exactly as received (delivered from where it is, no copy)."""
        return self.head is None and not self.trace

    def _head(self) -> bytes:
        return self.message.original_head if self.head is None else self.head

    @property
    def size(self) -> int:
        return len(self.trace) + self.message.size_with(self._head())

    def read_at(self, offset: int, n: int) -> bytes:
        head = self._head()
        return chained(self.trace, lambda o, k: self.message.read_at(o, k, head))(offset, n)

    def pieces(self, size: int = PIECE) -> Iterator[bytes]:
        for offset in range(0, self.size, size):
            yield self.read_at(offset, size)

    def __bytes__(self) -> bytes:
        return self.read_at(0, self.size)


@dataclass(slots=True)
class Environment:
    """What a script may learn about the delivery besides the message."""

    envelope_from: str = ""
    envelope_to: str = ""
    orig_to: str | None = None
    auth: str | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    subaddress_delimiter: str = "+"  # RFC 5233 §4 (postier's plus-addressing)
    default_mailbox: str = "INBOX"
    mailbox_exists: Callable[[str], bool] = lambda name: name == "INBOX"
    load_script: Callable[[str, str], Script | None] = lambda location, name: None
    duplicate_seen: Callable[[str], bool] = lambda key: False
    spamtest: Callable[[Message, bool], str] = lambda message, percent: "0"
    virustest: Callable[[Message], str] = lambda message: "0"
    forbid_add: frozenset[str] = frozenset()  # header names (lower case) scripts may not add
    forbid_delete: frozenset[str] = frozenset()  # ... or delete, besides RFC 5293 §6's own
    environment: dict[str, str] = field(default_factory=lambda: {  # RFC 5183 §4 items
        "name": "postier", "version": __version__, "location": "MDA", "phase": "during"})
    limits: Limits = field(default_factory=Limits)


# -- result --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Action:
    """One action; ``kind`` uses Pigeonhole's names: keep, store (fileinto), redirect, discard,
    reject, ereject, vacation."""

    kind: str
    target: str = ""  # mailbox, address or reason
    flags: tuple[str, ...] | None = None
    copy: bool = False
    create: bool = False
    vacation: dict[str, object] | None = None
    head: bytes | None = None  # the header fields as edited (RFC 5293) when the action was taken


@dataclass(slots=True)
class Result:
    actions: list[Action] = field(default_factory=list)
    implicit_keep: bool = True
    implicit_flags: tuple[str, ...] = ()
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    duplicate_marks: list[tuple[str, int]] = field(default_factory=list)

    def final(self, default_mailbox: str = "INBOX") -> list[Action]:
        """What delivery does: the actions, plus the implicit keep (RFC 5228 §2.10.2); after a
        runtime error, the implicit keep only (§2.10.6)."""
        if self.error is not None:
            return [Action("keep", default_mailbox)]
        out = list(self.actions)
        if self.implicit_keep and not any(a.kind in ("keep",) for a in out):
            out.append(Action("keep", default_mailbox, self.implicit_flags or None))
        return out


def parse_address(text: str) -> tuple[str, str] | None:
    """(local part, domain) of the first address in ``text``; None when there is none."""
    for a in parse_addresses(text.encode("utf-8")):
        if a.mailbox is None or a.host is None:
            continue
        host = "" if a.host == MISSING_DOMAIN else a.host.decode("utf-8", "replace")
        return a.mailbox.decode("utf-8", "replace"), host
    return None


# -- interpreter ---------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|[0-9]+)\}")
_PROTECTED = frozenset({"received", "auto-submitted"})  # RFC 5293 §6: never added or removed
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

Handler = Callable[["Interpreter", Node], None]
TestHandler = Callable[["Interpreter", Node], bool]


class Interpreter:
    """One run of a script over a message; ``run()`` returns the Result (never raises for script
    errors). Subclasses add commands and tests through ``commands`` and ``tests``."""

    commands: dict[str, Handler] = {}
    tests: dict[str, TestHandler] = {}

    def __init__(self, script: Script, message: Message, env: Environment,
                 result: Result | None = None) -> None:
        self.script = script
        self.message = message
        self.env = env
        self.limits = env.limits
        self.result = result if result is not None else Result()
        self.steps = 0
        self.match_seconds = 0.0
        self.variables: dict[str, str] = {}
        self.globals: dict[str, str] = {}
        self.match_values: list[str] = []
        self.flags: list[str] = list(self.result.implicit_flags)
        self.included: set[tuple[str, str]] = set()
        self.include_count = 0
        self.include_stack: list[tuple[str, str]] = [(script.location, script.name)]
        self.global_names: set[str] = set()

    # -- driving --------------------------------------------------------------------------------

    def run(self) -> Result:
        try:
            self.block(self.script.commands)
        except _Stop:
            pass
        except _Return:
            pass
        except SieveRuntimeError as e:
            self.result.error = str(e)
        except MatchError as e:
            self.result.error = str(e)
        except RecursionError:
            self.result.error = "script nested too deeply"
        self.result.implicit_flags = tuple(self.flags)
        return self.result

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:  # the CPU budget
            raise SieveRuntimeError("execution exceeded its CPU limit")

    def has(self, ext: str) -> bool:
        return ext in self.script.requires

    def block(self, nodes: list[Node]) -> None:
        for node in nodes:
            self.step()
            handler = self.commands.get(node.name)
            if handler is None:
                raise SieveRuntimeError(f"line {node.line}: unsupported command {node.name}")
            handler(self, node)

    def test(self, node: Node) -> bool:
        self.step()
        handler = self.tests.get(node.name)
        if handler is None:
            raise SieveRuntimeError(f"line {node.line}: unsupported test {node.name}")
        return handler(self, node)

    # -- strings and variables (RFC 5229 §3) -----------------------------------------------------

    def expand(self, s: str) -> str:
        if "${" not in s or not self.has("variables"):
            return s

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.isdigit():
                i = int(name)
                return self.match_values[i] if i < len(self.match_values) else ""
            return self.get_variable(name.lower(), m.group(0))

        return _VAR.sub(repl, s)

    def get_variable(self, name: str, literal: str) -> str:
        if name.startswith("global."):
            return self.globals.get(name[7:], "")
        if name in self.global_names:
            return self.globals.get(name, "")
        if "." in name:
            return self.namespace_variable(name, literal)
        return self.variables.get(name, "")

    def namespace_variable(self, name: str, literal: str) -> str:
        return literal if name.split(".")[0] not in ("env",) else self.env.environment.get(name[4:], "")

    def set_variable(self, name: str, value: str) -> None:
        name = name.lower()
        if len(value) * 4 > self.limits.max_variable_size:  # RFC 5229 §6: octets, whole characters
            value = value.encode("utf-8")[: self.limits.max_variable_size].decode("utf-8", "ignore")
        if name.startswith("global."):
            target, name = self.globals, name[7:]
        elif name in self.global_names:
            target = self.globals
        else:
            target = self.variables
        if name not in target and len(target) >= self.limits.max_variables:
            raise SieveRuntimeError("too many variables")
        target[name] = value

    def s(self, node: Node, i: int) -> str:
        return self.expand(str(node.pos[i]))

    def sl(self, value: object) -> list[str]:
        assert isinstance(value, list)
        return [self.expand(str(v)) for v in value]

    def tag_s(self, node: Node, name: str) -> str | None:
        v = node.tags.get(name)
        return None if v is None else self.expand(str(v))

    # -- matching -------------------------------------------------------------------------------

    def matcher(self, node: Node) -> tuple[str, str | None, str]:
        mt = node.tags.get("match", ("is", None))
        assert isinstance(mt, tuple)
        cmp = str(node.tags.get("comparator", "i;ascii-casemap"))
        return str(mt[0]), mt[1], cmp

    def match(self, node: Node, values: Iterable[str], keys: list[str]) -> bool:
        """RFC 5228 §2.7: true when any value matches any key; :count (RFC 5231 §4.2) counts."""
        mtype, rel, cmp = self.matcher(node)
        if mtype == "count":
            assert rel is not None
            count = str(sum(1 for _ in values))
            self.step()
            return any(compare_relational(cmp, rel, count, k) for k in keys)
        capture = mtype in ("matches", "regex") and self.has("variables")
        for v in values:
            for k in keys:
                self.step()
                try:
                    if mtype in ("matches", "regex"):
                        m = self._timed_match(mtype, cmp, rel, v, k)
                    else:
                        m = match_value(mtype, cmp, rel, v, k)
                except MatchTimeout:
                    raise SieveRuntimeError("pattern matching exceeded its time limit") from None
                except MatchError as e:  # a regex from a variable: no match, reported as a warning
                    if len(self.result.warnings) < 10:
                        self.result.warnings.append(str(e))
                    continue
                if m is not None:
                    if capture:  # RFC 5229 §3.2: only a successful match sets ${0}..
                        self.match_values = m[: self.limits.max_match_values]
                    return True
        return False

    def _timed_match(self, mtype: str, cmp: str, rel: str | None, v: str, k: str) -> list[str] | None:
        """A :matches/:regex search within what is left of the run's pattern-time budget (the one
        cost the step budget cannot bound: a single backtracking search)."""
        left = self.limits.max_match_seconds - self.match_seconds
        if left <= 0:
            raise MatchTimeout("budget spent")
        start = time.monotonic()
        try:
            return match_value(mtype, cmp, rel, v, k, timeout=left)
        finally:
            self.match_seconds += time.monotonic() - start

    # -- message access -------------------------------------------------------------------------

    def header_values(self, node: Node, names: list[str]) -> Iterator[str]:
        for name in names:
            raws = self.message.values(name)
            for raw in self.indexed(node, raws):
                yield decode_header_text(raw).strip(" \t")

    def indexed(self, node: Node, values: list[bytes]) -> list[bytes]:
        """RFC 5260 §6 :index/:last: the Nth field (from the end with :last)."""
        idx = node.tags.get("index")
        if not isinstance(idx, int):
            return values
        pos = len(values) - idx if node.tags.get("last") else idx - 1
        return [values[pos]] if 0 <= pos < len(values) else []

    def address_part(self, node: Node, local: str, domain: str) -> str | None:
        """RFC 5228 §2.7.4 and RFC 5233 §4."""
        part = str(node.tags.get("addrpart", "all"))
        if part == "localpart":
            return local
        if part == "domain":
            return domain
        if part in ("user", "detail"):
            delims = self.env.subaddress_delimiter
            at = min((local.find(d) for d in delims if d and d in local), default=-1)
            if part == "user":
                return local if at < 0 else local[:at]
            return None if at < 0 else local[at + 1 :]
        return addr_spec(local, domain) if domain else local


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*")


def addr_spec(local: str, domain: str) -> str:
    """local@domain with the local part quoted when it is not a dot-atom (RFC 5322 §3.4.1)."""
    if not _DOT_ATOM.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}"


def _command(name: str) -> Callable[[Handler], Handler]:
    def deco(f: Handler) -> Handler:
        Interpreter.commands[name] = f
        return f
    return deco


def _test(name: str) -> Callable[[TestHandler], TestHandler]:
    def deco(f: TestHandler) -> TestHandler:
        Interpreter.tests[name] = f
        return f
    return deco


# -- control (RFC 5228 §3) -------------------------------------------------------------------------

@_command("if")
def _if(ip: Interpreter, node: Node) -> None:
    for branch in [node, *node.branches]:  # RFC 5228 §3.1
        if branch.name == "else" or ip.test(branch.tests[0]):
            ip.block(branch.block or [])
            return


@_command("stop")
def _stop(ip: Interpreter, node: Node) -> None:
    raise _Stop


@_command("require")
def _require(ip: Interpreter, node: Node) -> None:
    return


# -- actions (RFC 5228 §4) -------------------------------------------------------------------------

def _flags_of(ip: Interpreter, node: Node) -> tuple[str, ...] | None:
    if not ip.has("imap4flags"):
        return None
    if "flags" in node.tags:  # RFC 5232 §5: :flags replaces the internal variable for this action
        return tuple(_flag_list(ip.sl(node.tags["flags"])))
    return tuple(ip.flags)


def add_action(ip: Interpreter, action: Action) -> None:
    """Add an action: duplicates merge (RFC 5228 §2.10.3), conflicts and limits are runtime errors."""
    res = ip.result
    # RFC 5293 §7: each action sees the header as it was then (unedited: the original's fields, so
    # an addheader after a fileinto does not reach that copy); only the implicit keep, added by
    # `Result.final`, takes the header as the script left it
    action.head = ip.message.head
    kinds = {a.kind for a in res.actions}
    if action.kind in ("reject", "ereject"):
        # RFC 5429 §2.2: reject is incompatible with keep, fileinto, redirect and vacation
        if kinds & {"keep", "store", "vacation", "reject", "ereject"} or any(
                a.kind == "redirect" and not a.copy for a in res.actions):
            raise SieveRuntimeError(f"{action.kind} conflicts with other actions")
    elif ("reject" in kinds or "ereject" in kinds) and (
            action.kind in ("keep", "store", "vacation") or (action.kind == "redirect" and not action.copy)):
        raise SieveRuntimeError(f"{action.kind} conflicts with reject")
    if action.kind == "vacation" and "vacation" in kinds:  # RFC 5230 §4.7: only one vacation
        raise SieveRuntimeError("duplicate vacation action")
    for a in res.actions:
        same = (a.kind in ("keep", "store") and action.kind in ("keep", "store")
                and a.target == action.target) or (
            a.kind == action.kind == "redirect" and a.target == action.target) or (
            a.kind == action.kind == "discard")
        if same:
            if action.flags is not None:
                a.flags = action.flags
            if action.kind == "keep" and a.kind == "store":
                a.kind = "keep"
            a.copy = a.copy and action.copy
            a.head = action.head if action.head is not None else a.head
            a.create = a.create or action.create
            _cancel_keep(ip, action)
            return
    if len(res.actions) >= ip.limits.max_actions:
        raise SieveRuntimeError(f"total number of actions exceeds policy limit ({ip.limits.max_actions})")
    if action.kind == "redirect" and sum(a.kind == "redirect" for a in res.actions) >= ip.limits.max_redirects:
        raise SieveRuntimeError(f"number of redirect actions exceeds policy limit ({ip.limits.max_redirects})")
    res.actions.append(action)
    _cancel_keep(ip, action)


def _cancel_keep(ip: Interpreter, action: Action) -> None:
    if not action.copy:  # RFC 3894 §3: :copy leaves the implicit keep alone
        ip.result.implicit_keep = False


@_command("keep")
def _keep(ip: Interpreter, node: Node) -> None:
    add_action(ip, Action("keep", ip.env.default_mailbox, _flags_of(ip, node)))


@_command("discard")
def _discard(ip: Interpreter, node: Node) -> None:
    ip.result.implicit_keep = False  # RFC 5228 §4.4


@_command("fileinto")
def _fileinto(ip: Interpreter, node: Node) -> None:
    mailbox = ip.s(node, 0)
    if not mailbox or "\0" in mailbox or "\ufffd" in mailbox or len(mailbox) > 1024:
        # U+FFFD: octets that were not UTF-8 (RFC 5228 §2.4.2.4 hex escapes), never a real name
        raise SieveRuntimeError(f"invalid folder name {mailbox!r}")
    if mailbox.upper() == "INBOX" or mailbox[:6].upper() == "INBOX.":  # RFC 3501 §5.1: any case
        mailbox = "INBOX" + mailbox[5:]
    add_action(ip, Action("store", mailbox, _flags_of(ip, node), copy=bool(node.tags.get("copy")),
                          create=bool(node.tags.get("create"))))


@_command("redirect")
def _redirect(ip: Interpreter, node: Node) -> None:
    text = ip.s(node, 0)
    addr = parse_address(text)
    if addr is None or not addr[0] or not addr[1]:  # RFC 5228 §4.2
        raise SieveRuntimeError(f"invalid redirect address {text!r}")
    add_action(ip, Action("redirect", addr_spec(addr[0], addr[1].lower()), copy=bool(node.tags.get("copy"))))


@_command("reject")
def _reject(ip: Interpreter, node: Node) -> None:
    add_action(ip, Action("reject", ip.s(node, 0)))


@_command("ereject")
def _ereject(ip: Interpreter, node: Node) -> None:
    add_action(ip, Action("ereject", ip.s(node, 0)))


@_command("vacation")
def _vacation(ip: Interpreter, node: Node) -> None:
    """RFC 5230 §4: recorded here; whether a reply goes out is ``vacation.should_reply``."""
    period = node.tags.get("period", ("days", 7))
    assert isinstance(period, tuple)
    seconds = int(period[1]) * (86400 if period[0] == "days" else 1)
    params: dict[str, object] = {
        "reason": ip.s(node, 0), "seconds": seconds, "subject": ip.tag_s(node, "subject"),
        "from": ip.tag_s(node, "from"), "mime": bool(node.tags.get("mime")),
        "addresses": ip.sl(node.tags["addresses"]) if "addresses" in node.tags else [],
        "handle": ip.tag_s(node, "handle"),
    }
    add_action(ip, Action("vacation", str(params["reason"]), vacation=params, copy=True))


# -- tests (RFC 5228 §5) ---------------------------------------------------------------------------

@_test("true")
def _true(ip: Interpreter, node: Node) -> bool:
    return True


@_test("false")
def _false(ip: Interpreter, node: Node) -> bool:
    return False


@_test("not")
def _not(ip: Interpreter, node: Node) -> bool:
    return not ip.test(node.tests[0])


@_test("allof")
def _allof(ip: Interpreter, node: Node) -> bool:
    return all(ip.test(t) for t in node.tests)  # RFC 5228 §5.2: short-circuit


@_test("anyof")
def _anyof(ip: Interpreter, node: Node) -> bool:
    return any(ip.test(t) for t in node.tests)


@_test("exists")
def _exists(ip: Interpreter, node: Node) -> bool:
    return all(ip.message.values(n) for n in ip.sl(node.pos[0]))  # RFC 5228 §5.5


@_test("size")
def _size(ip: Interpreter, node: Node) -> bool:
    limit = int(str(node.pos[0]))
    size = ip.message.size
    return size > limit if node.tags.get("over") else size < limit  # RFC 5228 §5.9


@_test("header")
def _header(ip: Interpreter, node: Node) -> bool:
    return ip.match(node, ip.header_values(node, ip.sl(node.pos[0])), ip.sl(node.pos[1]))


def _addresses(ip: Interpreter, node: Node, names: list[str]) -> Iterator[str]:
    for name in names:
        for raw in ip.indexed(node, ip.message.values(name)):
            for a in parse_addresses(raw):
                if a.mailbox is None or a.host is None:
                    continue  # group syntax
                local = decode_header_text(a.mailbox)
                domain = "" if a.host == MISSING_DOMAIN else a.host.decode("utf-8", "replace")
                part = ip.address_part(node, local, domain)
                if part is not None:
                    yield part


@_test("address")
def _address(ip: Interpreter, node: Node) -> bool:
    return ip.match(node, _addresses(ip, node, ip.sl(node.pos[0])), ip.sl(node.pos[1]))


def _envelope_path(raw: str) -> tuple[str, str] | None:
    """(local, domain) of an RFC 5321 §4.1.2 path (source route dropped), ("", "") for the null path,
    None when malformed; a bare address is read as if in angle brackets."""
    text = raw.strip()
    if text in ("", "<>"):
        return "", ""
    if not text.startswith("<"):
        text = f"<{text}>"
    try:
        addr, rest = parse_path(text, postmaster_ok=True)
        if not rest:
            return addr.local, addr.domain
    except AddressError:
        pass
    # Leniency as in Pigeonhole: dot-atoms with stray dots, "_" in host names, a bare local part
    m = _LENIENT_PATH.fullmatch(text)
    return (m.group(1), m.group(2) or "") if m else None


_HOST = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"
_LENIENT_PATH = re.compile(rf"<(?:@{_HOST}(?:,@{_HOST})*:)?([^@<>\s:,]+)(?:@({_HOST}))?>")


@_test("envelope")
def _envelope(ip: Interpreter, node: Node) -> bool:
    """RFC 5228 §5.4; the null reverse-path is the empty string."""
    values: list[str] = []
    for part_name in ip.sl(node.pos[0]):
        p = part_name.lower()
        raw = {"from": ip.env.envelope_from, "to": ip.env.envelope_to,
               "auth": ip.env.auth, "orig_to": ip.env.orig_to}.get(p)
        if raw is None:
            continue
        path = _envelope_path(raw)
        if path is None:
            continue  # not a valid RFC 5321 path: no value
        local, domain = path
        if not local and not domain:  # the null reverse-path: "" for every part
            values.append("")
            continue
        v = ip.address_part(node, local, domain)
        if v is not None:
            values.append(v)
    return ip.match(node, values, ip.sl(node.pos[1]))


# -- imap4flags (RFC 5232) -------------------------------------------------------------------------

def _flag_list(items: list[str]) -> list[str]:
    """RFC 5232 §3: space-separated flags, duplicates (case-insensitive) removed."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        for f in item.split():
            if f.lower() not in seen:
                seen.add(f.lower())
                out.append(f)
    return out


def _flag_target(ip: Interpreter, node: Node) -> tuple[str | None, list[str]]:
    if len(node.pos) == 2:
        return ip.s(node, 0), ip.sl(node.pos[1])
    return None, ip.sl(node.pos[0])


def _get_flags(ip: Interpreter, var: str | None) -> list[str]:
    return list(ip.flags) if var is None else _flag_list([ip.get_variable(var.lower(), "")])


def _put_flags(ip: Interpreter, var: str | None, flags: list[str]) -> None:
    if var is None:
        ip.flags = flags
    else:
        ip.set_variable(var, " ".join(flags))


@_command("setflag")
def _setflag(ip: Interpreter, node: Node) -> None:
    var, items = _flag_target(ip, node)
    _put_flags(ip, var, _flag_list(items))


@_command("addflag")
def _addflag(ip: Interpreter, node: Node) -> None:
    var, items = _flag_target(ip, node)
    _put_flags(ip, var, _flag_list([*_get_flags(ip, var), *items]))


@_command("removeflag")
def _removeflag(ip: Interpreter, node: Node) -> None:
    var, items = _flag_target(ip, node)
    drop = {f.lower() for f in _flag_list(items)}
    _put_flags(ip, var, [f for f in _get_flags(ip, var) if f.lower() not in drop])


@_test("hasflag")
def _hasflag(ip: Interpreter, node: Node) -> bool:
    if len(node.pos) == 2:
        flags = _flag_list([ip.get_variable(v.lower(), "") for v in ip.sl(node.pos[0])])
        keys = ip.sl(node.pos[1])
    else:
        flags, keys = list(ip.flags), ip.sl(node.pos[0])
    mtype = ip.matcher(node)[0]
    if mtype != "count":
        keys = _flag_list(keys)
    return ip.match(node, flags, keys)


# -- variables (RFC 5229) --------------------------------------------------------------------------

_WILDCARDS = re.compile(r"([*?\\])")
_REGEX_SPECIAL = re.compile(r"([\\^$.\[\]|()?*+{}])")


@_command("set")
def _set(ip: Interpreter, node: Node) -> None:
    value = ip.s(node, 1)
    t = node.tags
    # RFC 5229 §4.1: modifiers by precedence 40 (case), 30 (first), 20 (quote), 10 (length)
    if t.get("lower"):
        value = value.lower()
    if t.get("upper"):
        value = value.upper()
    if t.get("lowerfirst"):
        value = value[:1].lower() + value[1:]
    if t.get("upperfirst"):
        value = value[:1].upper() + value[1:]
    if t.get("quotewildcard"):
        value = _WILDCARDS.sub(r"\\\1", value)
        limit = ip.limits.max_variable_size
        if len(value.encode("utf-8")) > limit:  # never cut an escape pair in two
            value = value.encode("utf-8")[:limit].decode("utf-8", "ignore")
            if (len(value) - len(value.rstrip("\\"))) % 2:
                value = value[:-1]
    if t.get("quoteregex"):
        value = _REGEX_SPECIAL.sub(r"\\\1", value)
    if t.get("length"):
        value = str(len(value))
    ip.set_variable(str(node.pos[0]), value)


@_test("string")
def _string(ip: Interpreter, node: Node) -> bool:
    values = ip.sl(node.pos[0])
    if ip.matcher(node)[0] == "count":  # RFC 5229 §5: :count counts the non-empty strings
        values = [v for v in values if v]
    return ip.match(node, values, ip.sl(node.pos[1]))


@_test("environment")
def _environment(ip: Interpreter, node: Node) -> bool:
    name = ip.s(node, 0).lower()
    value = ip.env.environment.get(name)
    return value is not None and ip.match(node, [value], ip.sl(node.pos[1]))


# -- body (RFC 5173) -------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")
_CTYPE = re.compile(rb"\s*[^/\s;]+/[^/\s;]+\s*(?:;|\Z)")
_ENTITY = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&nbsp;": " ", "&#39;": "'"}


def _html_text(html: str) -> str:
    """Text of an HTML part for body :text: tags, scripts and styles dropped, entities decoded."""
    html = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", html)
    text = _TAG.sub(" ", html)
    return re.sub(r"&(?:lt|gt|amp|quot|nbsp|#39);", lambda m: _ENTITY[m.group(0)], text)


def _decoded(part: Part) -> str:
    try:
        data = decode_transfer_encoding(part.body, part.encoding)
    except Exception:
        data = part.body
    return data.decode("utf-8", "replace")


def _prologue_epilogue(part: Part) -> str:
    """RFC 5173 §5.2: a multipart's own text is its prologue and epilogue, without boundaries."""
    boundary = part.param("boundary")
    body = part.body.decode("utf-8", "replace")
    if not boundary:
        return body
    delim = "--" + boundary.decode("utf-8", "replace")
    lines = body.split("\r\n")
    out: list[str] = []
    state = "prologue"
    for line in lines:
        if line.startswith(delim):
            state = "epilogue" if line.rstrip().endswith(delim + "--") else "parts"
            continue
        if state != "parts":
            out.append(line)
    return "\r\n".join(out)


def _content_types(specs: list[str]) -> list[str]:
    """RFC 5173 §5.2: a type with a leading or trailing "/" or several "/" matches nothing."""
    out = []
    for spec in specs:
        spec = spec.lower().strip()
        if spec.startswith("/") or spec.endswith("/") or spec.count("/") > 1:
            continue
        out.append(spec)
    return out


def _text_leaf(part: Part) -> bool:
    """Whether body :text searches this leaf: a textual part with a valid type and a known encoding."""
    raw_ct = part.first("content-type")
    if raw_ct is not None and not _CTYPE.match(raw_ct):
        return False  # an invalid Content-Type ("text/plain/stupid") is no known text type
    if not (part.maintype == "text" or (part.maintype, part.subtype) == ("application", "xhtml+xml")):
        return False
    try:
        decode_transfer_encoding(b"", part.encoding)
    except UnknownCTE:
        return False  # undecodable: nothing to search
    return True


def _body_texts(ip: Interpreter, node: Node) -> Iterator[str]:
    """The texts a body test searches (RFC 5173 §5), each capped at ``limits.max_body`` and decoded
    from at most the first 2 × max_body octets of its part's body. A message above `WHOLE` octets
    is not read whole: :raw reads the first max_body octets of its body, :text and :content walk
    `Message.body_tree` (the bodies they do not read left out, or the first TEXT_LIMIT octets of the
    message when that is not enough)."""
    limit = ip.limits.max_body
    message = ip.message
    if not message.has_blank:  # RFC 5173 §4: a header without a blank line has no body at all
        return
    if node.tags.get("raw"):  # RFC 5173 §5.1: the undecoded body
        yield message.raw_body(limit).decode("utf-8", "replace")
        return
    text_mode = "content" not in node.tags
    wanted = ["text"] if text_mode else _content_types(ip.sl(node.tags["content"]))

    def matches(part: Part) -> bool:
        ct = f"{part.maintype}/{part.subtype}"
        return any(w == "" or w == ct or ("/" not in w and w == part.maintype) for w in wanted)

    def unread(leaf: Part) -> bool:
        return not (_text_leaf(leaf) if text_mode else matches(leaf))

    for part in message.body_tree(unread).walk():
        if not part.children and part.message is None:  # a leaf: decoded from its first octets only
            part = dataclasses.replace(part, end=min(part.end, part.body_start + 2 * limit))
        if text_mode:  # :text: every textual part, markup removed
            if part.is_multipart or part.message is not None or not _text_leaf(part):
                continue
            text = decode_body(part)
            if part.subtype in ("html", "xhtml+xml"):
                text = _html_text(text)
            yield text[:limit]
            continue
        if not matches(part):
            continue
        if part.is_multipart:
            yield _prologue_epilogue(part)[:limit]
        elif part.message is not None:  # message/rfc822: its header (§5.2)
            inner = part.message
            yield inner.msg[inner.start : inner.header_end].decode("utf-8", "replace")[:limit]
        elif part.maintype == "text":
            yield decode_body(part)[:limit]
        else:
            yield _decoded(part)[:limit]


@_test("body")
def _body(ip: Interpreter, node: Node) -> bool:
    saved = ip.match_values
    try:
        return ip.match(node, _body_texts(ip, node), ip.sl(node.pos[0]))
    finally:
        ip.match_values = saved  # RFC 5173 §6: body never sets match variables


# -- date (RFC 5260) -------------------------------------------------------------------------------

def _zone(text: str) -> dt.timezone | None:
    m = re.fullmatch(r"([+-])([0-9]{2})([0-9]{2})", text.strip())
    if not m:
        return None
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return dt.timezone(dt.timedelta(minutes=minutes if m.group(1) == "+" else -minutes))


def _zone_text(t: dt.datetime) -> str:
    off = t.utcoffset() or dt.timedelta(0)
    sign = "-" if off < dt.timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def date_part(t: dt.datetime, part: str) -> str:
    """RFC 5260 §4.2 date-part values."""
    part = part.lower()
    if part == "year":
        return f"{t.year:04d}"
    if part == "month":
        return f"{t.month:02d}"
    if part == "day":
        return f"{t.day:02d}"
    if part == "date":
        return f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
    if part == "julian":  # Modified Julian Day
        return str((t.date() - dt.date(1858, 11, 17)).days)
    if part == "hour":
        return f"{t.hour:02d}"
    if part == "minute":
        return f"{t.minute:02d}"
    if part == "second":
        return f"{t.second:02d}"
    if part == "time":
        return f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if part == "iso8601":
        z = _zone_text(t)
        return t.strftime("%Y-%m-%dT%H:%M:%S") + z[:3] + ":" + z[3:]
    if part == "std11":
        days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
        return (f"{days[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1].capitalize()} {t.year:04d} "
                f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} {_zone_text(t)}")
    if part == "zone":
        return _zone_text(t)
    if part == "weekday":
        return str((t.weekday() + 1) % 7)
    return ""


def parse_date(value: str) -> dt.datetime | None:
    """An RFC 5322 §3.3 date-time (leniently); None when it is not one."""
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    try:
        y, mo, d, h, mi, s = parsed[:6]
        if y < 100:
            y += 2000 if y < 50 else 1900
        tz = dt.timezone(dt.timedelta(seconds=parsed[9] or 0))
        return dt.datetime(y, mo, d, h, mi, min(s, 59), tzinfo=tz)
    except (ValueError, OverflowError):
        return None


def _in_zone(ip: Interpreter, node: Node, t: dt.datetime) -> dt.datetime:
    zone = node.tags.get("zone")
    if isinstance(zone, str):
        tz = _zone(ip.expand(zone))
        return t.astimezone(tz) if tz is not None else t
    if node.tags.get("originalzone"):
        return t
    return t.astimezone(ip.env.now.tzinfo)


@_test("date")
def _date(ip: Interpreter, node: Node) -> bool:
    header, part, keys = ip.s(node, 0), ip.s(node, 1), ip.sl(node.pos[2])
    values: list[str] = []
    for raw in ip.indexed(node, ip.message.values(header)):
        text = decode_header_text(raw)
        if header.lower() == "received":  # RFC 5260 §4.1: the date after the last ";"
            text = text.rpartition(";")[2]
        t = parse_date(text)
        if t is not None:
            values.append(date_part(_in_zone(ip, node, t), part))
    return ip.match(node, values, keys)


@_test("currentdate")
def _currentdate(ip: Interpreter, node: Node) -> bool:
    part, keys = ip.s(node, 0), ip.sl(node.pos[1])
    return ip.match(node, [date_part(_in_zone(ip, node, ip.env.now), part)], keys)


# -- spamtest, virustest (RFC 5235) --------------------------------------------------------------

@_test("spamtest")
def _spamtest(ip: Interpreter, node: Node) -> bool:
    value = ip.env.spamtest(ip.message, bool(node.tags.get("percent")))
    return ip.match(node, [value], [ip.s(node, 0)])


@_test("virustest")
def _virustest(ip: Interpreter, node: Node) -> bool:
    return ip.match(node, [ip.env.virustest(ip.message)], [ip.s(node, 0)])


# -- mailbox (RFC 5490) ----------------------------------------------------------------------------

@_test("mailboxexists")
def _mailboxexists(ip: Interpreter, node: Node) -> bool:
    return all(ip.env.mailbox_exists(n) for n in ip.sl(node.pos[0]))


# -- duplicate (RFC 7352) --------------------------------------------------------------------------

@_test("duplicate")
def _duplicate(ip: Interpreter, node: Node) -> bool:
    if "uniqueid" in node.tags:
        ident = ip.tag_s(node, "uniqueid") or ""
    else:
        header = ip.tag_s(node, "header") or "message-id"
        values = ip.message.values(header)
        if not values:
            return False  # RFC 7352 §3.1: no such header, never a duplicate
        ident = values[0].decode("utf-8", "replace")
    key = f"{ip.tag_s(node, 'handle') or ''}\0{ident}"
    seen = ip.env.duplicate_seen(key)
    seconds = int(str(node.tags.get("seconds", 7 * 86400)))
    if not (seen and node.tags.get("last")) or not seen:
        ip.result.duplicate_marks.append((key, seconds))  # RFC 7352 §3.3: recorded on success
    return seen


# -- editheader (RFC 5293) ------------------------------------------------------------------------

def _encode_value(value: str) -> bytes:
    if value.isascii():
        return b" " + value.encode("ascii")
    return b" " + Header(value, "utf-8").encode().encode("ascii")  # RFC 5293 §4: RFC 2047 when needed


@_command("addheader")
def _addheader(ip: Interpreter, node: Node) -> None:
    name, value = ip.s(node, 0), ip.s(node, 1)
    if not re.fullmatch(r"[!-9;-~]+", name):
        raise SieveRuntimeError(f"specified field name '{name}' is invalid")
    if name.lower() in _PROTECTED or name.lower() in ip.env.forbid_add:
        return  # RFC 5293 §6: silently ignored
    if len(name) + len(value) > ip.limits.max_header_size or "\0" in value:
        raise SieveRuntimeError("header field too large")
    value = re.sub(r"\r?\n(?![ \t])", "\r\n ", value)
    ip.message.add(name, _encode_value(value), bool(node.tags.get("last")))
    ip.step(10)


@_command("deleteheader")
def _deleteheader(ip: Interpreter, node: Node) -> None:
    name = ip.s(node, 0)
    if name.lower() in _PROTECTED or name.lower() in ip.env.forbid_delete:
        return  # RFC 5293 §6
    positions = [i for i, (n, _) in enumerate(ip.message.fields) if n.lower() == name.lower()]
    idx = node.tags.get("index")
    if isinstance(idx, int):
        k = len(positions) - idx if node.tags.get("last") else idx - 1
        positions = [positions[k]] if 0 <= k < len(positions) else []
    if len(node.pos) == 2:
        keys = ip.sl(node.pos[1])
        keep: list[int] = []
        for i in positions:
            value = decode_header_text(ip.message.fields[i][1].replace(b"\r\n", b"")).strip(" \t")
            saved = ip.match_values
            if ip.match(node, [value], keys):
                keep.append(i)
            ip.match_values = saved
        positions = keep
    if positions:
        ip.message.delete(set(positions))
    ip.step(len(positions) + 1)


# -- include (RFC 6609) ----------------------------------------------------------------------------

@_command("include")
def _include(ip: Interpreter, node: Node) -> None:
    location = "global" if node.tags.get("global") else "personal"
    name = ip.s(node, 0)
    if "/" in name or name in ("", ".", ".."):  # RFC 6609 §3.2: a script name, never a path
        raise SieveRuntimeError(f"invalid script name {name!r}")
    key = (location, name)
    if node.tags.get("once") and key in ip.included:
        return
    if key in ip.include_stack:  # RFC 6609 §3.2: recursion is an error
        raise SieveRuntimeError(f"circular include of script {name!r}")
    if len(ip.include_stack) >= ip.limits.max_include_depth:
        raise SieveRuntimeError("includes nested too deeply")
    ip.include_count += 1
    if ip.include_count > ip.limits.max_includes:
        raise SieveRuntimeError("too many includes")
    script = ip.env.load_script(location, name)
    if script is None:
        if node.tags.get("optional"):
            return
        raise SieveRuntimeError(f"included script {name!r} does not exist")
    ip.included.add(key)
    outer = (ip.script, ip.variables, ip.global_names)
    ip.script, ip.variables, ip.global_names = script, {}, set()
    ip.include_stack.append(key)
    try:
        ip.block(script.commands)
    except _Return:
        pass
    finally:
        ip.include_stack.pop()
        ip.script, ip.variables, ip.global_names = outer


@_command("return")
def _return(ip: Interpreter, node: Node) -> None:
    raise _Return


@_command("global")
def _global(ip: Interpreter, node: Node) -> None:
    for name in ip.sl(node.pos[0]):
        ip.global_names.add(name.lower())  # RFC 6609 §3.3


def run(script: Script, message: Message, env: Environment) -> Result:
    """Evaluate ``script`` once; the Result holds the actions (or the runtime error)."""
    return Interpreter(script, message, env).run()
