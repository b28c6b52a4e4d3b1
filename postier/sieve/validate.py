"""Sieve validation at upload time: commands, tests and tagged arguments checked against the extensions
a script requires (RFC 5228 §2.6, §2.10.5, §3.2, and each extension's RFC), compiled into ``Node`` trees.

Every error a script can have short of runtime data is found here, so delivery never meets a script it
cannot run: unknown commands and tests, a missing ``require``, wrong argument types or counts, unknown or
repeated tags, bad comparators and relational operators, ``elsif``/``else`` without ``if``, ``require``
after other commands, invalid variable names and encoded characters. Errors are collected (up to
``MAX_ERRORS``) with their line and column.

Which extensions exist is data: ``SPECS`` maps each command and test to a ``Spec``; a caller (the
conformance harness) may add its own specs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .match import MatchError, regex_compile
from .grammar import Command, NumberArg, SieveSyntaxError, StringList, TagArg, Test, parse

__all__ = [
    "CAPABILITIES", "SPECS", "CompileError", "Node", "Script", "SieveError", "Spec", "compile_script",
]

MAX_ERRORS = 20

# Capabilities postier supports (RFC 5228 §3.2 require names); ManageSieve announces these.
CAPABILITIES: frozenset[str] = frozenset({
    "fileinto", "reject", "ereject", "envelope", "encoded-character", "copy", "relational",
    "comparator-i;ascii-numeric", "comparator-i;octet", "comparator-i;ascii-casemap",
    "comparator-i;unicode-casemap", "subaddress", "imap4flags", "body", "variables", "date", "index",
    "spamtest", "spamtestplus", "virustest", "include", "duplicate", "editheader", "mailbox", "regex",
    "vacation", "vacation-seconds", "environment",
})
_IMPLIES = {"spamtestplus": ("spamtest",), "vacation-seconds": ("vacation",)}


@dataclass(frozen=True, slots=True)
class SieveError:
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class CompileError(Exception):
    """A script refused at upload time; ``errors`` are ordered by position."""

    def __init__(self, errors: list[SieveError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


# A tag: (argument kind "" / "s" / "l" / "n", required extension or None, exclusive group or None)
_Tag = tuple[str, str | None, str | None]

_MATCH: dict[str, _Tag] = {
    "is": ("", None, "match"), "contains": ("", None, "match"), "matches": ("", None, "match"),
    "regex": ("", "regex", "match"), "value": ("s", "relational", "match"),
    "count": ("s", "relational", "match"), "comparator": ("s", None, None),
}
_ADDR: dict[str, _Tag] = {
    "all": ("", None, "addrpart"), "localpart": ("", None, "addrpart"), "domain": ("", None, "addrpart"),
    "user": ("", "subaddress", "addrpart"), "detail": ("", "subaddress", "addrpart"),
}
_INDEX: dict[str, _Tag] = {"index": ("n", "index", None), "last": ("", "index", None)}


@dataclass(frozen=True, slots=True)
class Spec:
    """One command or test: positional forms (each a tuple of "s" string, "l" string-list, "n"
    number), tags, block and test arguments."""

    test: bool  # a test (True) or a command (False)
    ext: tuple[str, ...] = ()  # any one of these capabilities enables it; () is the base language
    forms: tuple[tuple[str, ...], ...] = ((),)
    tags: Mapping[str, _Tag] = field(default_factory=dict)
    block: bool = False
    tests: str = "none"  # "none", "one", "list"
    required_groups: tuple[str, ...] = ()
    both: bool = False  # usable as a command and as a test


def _m(*more: Mapping[str, _Tag]) -> dict[str, _Tag]:
    out: dict[str, _Tag] = {}
    for d in more:
        out.update(d)
    return out


SPECS: dict[str, Spec] = {
    # RFC 5228 §3 control commands
    "require": Spec(False, forms=(("l",),)),
    "if": Spec(False, block=True, tests="one"),
    "elsif": Spec(False, block=True, tests="one"),
    "else": Spec(False, block=True),
    "stop": Spec(False),
    # RFC 5228 §4 actions
    "keep": Spec(False, tags={"flags": ("l", "imap4flags", None)}),
    "discard": Spec(False),
    "redirect": Spec(False, forms=(("s",),), tags={"copy": ("", "copy", None)}),
    "fileinto": Spec(False, ("fileinto",), (("s",),), {
        "copy": ("", "copy", None), "flags": ("l", "imap4flags", None), "create": ("", "mailbox", None)}),
    "reject": Spec(False, ("reject",), (("s",),)),  # RFC 5429
    "ereject": Spec(False, ("ereject",), (("s",),)),
    # RFC 5232 imap4flags
    "setflag": Spec(False, ("imap4flags",), (("l",), ("s", "l"))),
    "addflag": Spec(False, ("imap4flags",), (("l",), ("s", "l"))),
    "removeflag": Spec(False, ("imap4flags",), (("l",), ("s", "l"))),
    # RFC 5229 variables
    "set": Spec(False, ("variables",), (("s", "s"),), {
        "lower": ("", None, "case"), "upper": ("", None, "case"), "lowerfirst": ("", None, "first"),
        "upperfirst": ("", None, "first"), "quotewildcard": ("", None, "quote"),
        "quoteregex": ("", "regex", "quote"), "length": ("", None, "length")}),
    # RFC 5230, RFC 6131 vacation
    "vacation": Spec(False, ("vacation",), (("s",),), {
        "days": ("n", "vacation", "period"), "seconds": ("n", "vacation-seconds", "period"),
        "subject": ("s", None, None), "from": ("s", None, None), "addresses": ("l", None, None),
        "mime": ("", None, None), "handle": ("s", None, None)}),
    # RFC 6609 include
    "include": Spec(False, ("include",), (("s",),), {
        "personal": ("", None, "location"), "global": ("", None, "location"),
        "once": ("", None, None), "optional": ("", None, None)}),
    "return": Spec(False, ("include",)),
    "global": Spec(False, ("include",), (("l",),)),
    # RFC 5293 editheader
    "addheader": Spec(False, ("editheader",), (("s", "s"),), {"last": ("", None, None)}),
    "deleteheader": Spec(False, ("editheader",), (("s",), ("s", "l")), _m(
        _MATCH, {"index": ("n", None, None), "last": ("", None, None)})),
    # RFC 5228 §5 tests
    "address": Spec(True, forms=(("l", "l"),), tags=_m(_MATCH, _ADDR, _INDEX)),
    "envelope": Spec(True, ("envelope",), (("l", "l"),), _m(_MATCH, _ADDR)),
    "header": Spec(True, forms=(("l", "l"),), tags=_m(_MATCH, _INDEX)),
    "exists": Spec(True, forms=(("l",),)),
    "size": Spec(True, forms=(("n",),), tags={"over": ("", None, "size"), "under": ("", None, "size")},
                 required_groups=("size",)),
    "true": Spec(True),
    "false": Spec(True),
    "not": Spec(True, tests="one"),
    "allof": Spec(True, tests="list"),
    "anyof": Spec(True, tests="list"),
    # RFC 5173 body
    "body": Spec(True, ("body",), (("l",),), _m(_MATCH, {
        "raw": ("", None, "transform"), "content": ("l", None, "transform"), "text": ("", None, "transform")})),
    "string": Spec(True, ("variables",), (("l", "l"),), _MATCH),
    "hasflag": Spec(True, ("imap4flags",), (("l",), ("l", "l")), _MATCH),
    # RFC 5260 date
    "date": Spec(True, ("date",), (("s", "s", "l"),), _m(_MATCH, _INDEX, {
        "zone": ("s", None, "zone"), "originalzone": ("", None, "zone")})),
    "currentdate": Spec(True, ("date",), (("s", "l"),), _m(_MATCH, {"zone": ("s", None, "zone")})),
    # RFC 5235 spamtest, virustest
    "spamtest": Spec(True, ("spamtest", "spamtestplus"), (("s",),), _m(
        _MATCH, {"percent": ("", "spamtestplus", None)})),
    "virustest": Spec(True, ("virustest",), (("s",),), _MATCH),
    # RFC 5490 mailbox
    "mailboxexists": Spec(True, ("mailbox",), (("l",),)),
    # RFC 7352 duplicate
    "duplicate": Spec(True, ("duplicate",), ((),), {
        "handle": ("s", None, None), "header": ("s", None, "id"), "uniqueid": ("s", None, "id"),
        "seconds": ("n", None, None), "last": ("", None, None)}),
    # RFC 5183 environment
    "environment": Spec(True, ("environment",), (("s", "l"),), _MATCH),
}

_RELATIONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
_DATE_PARTS = frozenset({"year", "month", "day", "date", "julian", "hour", "minute", "second", "time",
                         "iso8601", "std11", "zone", "weekday"})
MAX_VARIABLES = 255  # as Limits.max_variables
MAX_VARIABLE_NAME = 64
MAX_MATCH_INDEX = 32  # ${0}..${32}; RFC 5229 §3.2 asks for at least 9
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|[0-9]+)\}")
_VARNAME = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


@dataclass(slots=True)
class Node:
    """A validated command or test: tags by name (match type under "match" as (type, relation),
    address part under "addrpart"), positional values (str, list[str] or int), sub-tests, block and,
    for ``if``, the ``elsif``/``else`` branches that follow it."""

    name: str
    tags: dict[str, object]
    pos: list[object]
    tests: list[Node]
    block: list[Node] | None
    line: int
    column: int
    branches: list[Node] = field(default_factory=list)


@dataclass(slots=True)
class Script:
    name: str
    requires: frozenset[str]
    commands: list[Node]
    location: str = "personal"  # RFC 6609 §3.2: where include found it (personal or global)


# -- encoded-character (RFC 5228 §2.4.2.4) ------------------------------------------------------

_ENCODED = re.compile(r"\$\{(hex|unicode):([^}$]*)\}", re.IGNORECASE)


def _decode_encoded(s: str, errors: list[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        kind, body = m.group(1).lower(), m.group(2)
        words = body.split()
        if not words or not all(re.fullmatch(r"[0-9A-Fa-f]+", w) for w in words) or \
                not re.fullmatch(r"[ \t\r\n]*(?:[0-9A-Fa-f]+[ \t\r\n]*)+", body):
            return m.group(0)  # not an encoded character: left as written
        if kind == "hex":
            if any(len(w) > 2 for w in words):  # hex-pair = 1*2HEXDIG
                return m.group(0)
            return bytes(int(w, 16) for w in words).decode("utf-8", "replace")
        out = []
        for w in words:
            cp = int(w[-8:], 16) if len(w.lstrip("0")) <= 8 else 0x110000
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:  # RFC 5228 §2.4.2.4: an error
                errors.append(f"invalid unicode character 0x{w} in encoded character")
                return m.group(0)
            out.append(chr(cp))
        return "".join(out)

    return _ENCODED.sub(repl, s)


# -- validation -----------------------------------------------------------------------------------

class _Validator:
    def __init__(self, specs: Mapping[str, Spec], capabilities: frozenset[str]) -> None:
        self.specs = specs
        self.capabilities = capabilities
        self.requires: set[str] = set()
        self.errors: list[SieveError] = []
        self.declared: set[str] = set()

    def err(self, line: int, column: int, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(SieveError(line, column, msg))

    def has(self, ext: str) -> bool:
        return ext in self.requires

    def string(self, value: str, line: int, column: int) -> str:
        if self.has("encoded-character"):
            errs: list[str] = []
            value = _decode_encoded(value, errs)
            for e in errs:
                self.err(line, column, e)
        if "${" in value and self.has("variables"):
            self.variable_refs(value, line, column)
        return value

    def variable_refs(self, value: str, line: int, column: int) -> None:
        """RFC 5229 §3: references to unknown namespaces, over-long names and match variables past
        the limit are errors at upload."""
        known = {"global"} | ({"tst"} if self.has("vnd.dovecot.testsuite") else set())
        for m in _VAR_REF.finditer(value):
            name = m.group(1)
            if name.isdigit():
                if int(name) > MAX_MATCH_INDEX:
                    self.err(line, column, f"match variable index {name} is out of range (max "
                                           f"{MAX_MATCH_INDEX})")
            elif len(name) > MAX_VARIABLE_NAME:
                self.err(line, column, f"variable name '{name[:20]}...' is too long")
            elif "." in name and name.split(".")[0].lower() not in known:
                self.err(line, column, f"unknown variable namespace in '{name}'")

    def commands(self, cmds: Iterable[Command], top: bool) -> list[Node]:
        out: list[Node] = []
        prev: str | None = None
        allow_require = top
        for c in cmds:
            if c.name == "require":
                if not allow_require:  # RFC 5228 §3.2: require only at the start
                    self.err(c.line, c.column, "require command must be at the top of the script")
                self.require(c)
                prev = c.name
                continue
            allow_require = False
            node = self.node(c, False)
            if node is None:
                prev = c.name
                continue
            if c.name in ("elsif", "else"):  # RFC 5228 §3.1
                if prev not in ("if", "elsif") or not out:
                    self.err(c.line, c.column, f"{c.name} command without a preceding if or elsif")
                else:
                    out[-1].branches.append(node)
                prev = c.name
                continue
            out.append(node)
            prev = c.name
        return out

    def require(self, c: Command) -> None:
        if c.tests or c.block is not None or len(c.args) != 1 or not isinstance(c.args[0], StringList):
            self.err(c.line, c.column, "require command takes one string list")
            return
        for item in c.args[0].items:
            name = item.value
            if name not in self.capabilities:  # RFC 5228 §3.2: unknown capability is an error
                self.err(item.line, item.column, f"unsupported sieve capability '{name}'")
                continue
            self.requires.add(name)
            self.requires.update(_IMPLIES.get(name, ()))

    def node(self, c: Command | Test, as_test: bool) -> Node | None:
        kind = "test" if as_test else "command"
        spec = self.specs.get(c.name)
        if spec is None or (spec.test != as_test and not spec.both):
            self.err(c.line, c.column, f"unknown {kind} '{c.name}'")
            return None
        if spec.ext and not any(self.has(e) for e in spec.ext):
            self.err(c.line, c.column, f"{kind} '{c.name}' requires extension '{spec.ext[0]}'")
            return None
        node = Node(c.name, {}, [], [], None, c.line, c.column)
        mark = len(self.errors)
        ok = self.arguments(c, spec, node, kind)
        stray_tests = spec.tests == "none" and bool(c.tests) and len(self.errors) == mark
        if spec.tests == "none" and c.tests:  # (its tests are then not checked: one error for it all)
            self.err(c.line, c.column, f"the {c.name} {kind} accepts no tests")
            ok = False
        elif spec.tests == "one" and (len(c.tests) != 1 or c.test_list):
            self.err(c.line, c.column, f"the {c.name} {kind} requires one test")
            ok = False
        elif spec.tests == "list" and not c.test_list:
            self.err(c.line, c.column, f"the {c.name} {kind} requires a test list")
            ok = False
        if isinstance(c, Command):
            if spec.block and c.block is None:
                self.err(c.line, c.column, f"the {c.name} command requires a block")
                ok = False
            elif not spec.block and c.block is not None:
                self.err(c.line, c.column, f"the {c.name} command does not accept a block")
                ok = False
        del self.errors[mark + 1 :]  # one error per command or test: the first says what is wrong
        for t in () if stray_tests else c.tests:  # sub-tests and blocks are still checked on their own
            sub = self.node(t, True)
            if sub is not None:
                node.tests.append(sub)
        if isinstance(c, Command) and c.block is not None:
            node.block = self.commands(c.block, False)
        return node if ok else None

    def arguments(self, c: Command | Test, spec: Spec, node: Node, kind: str) -> bool:
        ok = True
        groups: dict[str, str] = {}
        positional: list[NumberArg | StringList] = []
        args = list(c.args)
        i = 0
        while i < len(args):
            a = args[i]
            i += 1
            if not isinstance(a, TagArg):
                positional.append(a)
                continue
            if positional:  # RFC 5228 §2.6.2: tagged arguments precede positional ones
                self.err(a.line, a.column, f"tagged argument ':{a.name}' after positional arguments "
                                           f"of the {c.name} {kind}")
                ok = False
            tag = spec.tags.get(a.name)
            if tag is None or (tag[1] is not None and not self.has(tag[1])):
                self.err(a.line, a.column, f"unknown tagged argument ':{a.name}' for the {c.name} {kind}")
                ok = False
                continue
            argkind, _, group = tag
            key = a.name
            if group is not None:
                if group in groups:
                    self.err(a.line, a.column, f"tagged argument ':{a.name}' conflicts with "
                                               f"':{groups[group]}' of the {c.name} {kind}")
                    ok = False
                groups[group] = a.name
            if (key in node.tags or (group == "match" and "match" in node.tags)) and group != "match":
                self.err(a.line, a.column, f"tagged argument ':{a.name}' given twice")
                ok = False
            value: object = True
            if argkind:
                if i >= len(args) or isinstance(args[i], TagArg):
                    self.err(a.line, a.column, f"tagged argument ':{a.name}' requires a value")
                    ok = False
                    continue
                v = args[i]
                i += 1
                value = self.value(v, argkind, f"':{a.name}' of the {c.name} {kind}")
                if value is None:
                    ok = False
                    continue
            if group == "match":
                if key in ("value", "count"):
                    rel = str(value).lower()
                    if rel not in _RELATIONS:  # RFC 5231 §5
                        self.err(a.line, a.column, f"invalid relational match '{value}'")
                        ok = False
                    node.tags["match"] = (key, rel)
                else:
                    node.tags["match"] = (key, None)
            elif group == "addrpart":
                node.tags["addrpart"] = key
            elif key == "comparator":
                cmp = str(value).lower()
                if cmp not in ("i;octet", "i;ascii-casemap", "i;unicode-casemap") and not self.has("comparator-" + cmp):
                    # RFC 5228 §2.7.3: comparators other than the two defaults must be required
                    self.err(a.line, a.column, f"unknown comparator '{value}'")
                    ok = False
                node.tags["comparator"] = cmp
            else:
                node.tags[key] = value
        for g in spec.required_groups:
            if g not in groups:
                self.err(c.line, c.column, f"the {c.name} {kind} requires a :{'/:'.join(
                    n for n, t in spec.tags.items() if t[2] == g)} argument")
                ok = False
        form = next((f for f in spec.forms if len(f) == len(positional)), None)
        if form is None:
            want = " or ".join(str(len(f)) for f in spec.forms)
            self.err(c.line, c.column, f"the {c.name} {kind} requires {want} positional argument(s), "
                                       f"but {len(positional)} were found")
            return False
        for n, (want_kind, arg) in enumerate(zip(form, positional, strict=True), 1):
            got = self.value(arg, want_kind, f"argument {n} of the {c.name} {kind}")
            if got is None:
                ok = False
            else:
                node.pos.append(got)
        if ok:
            ok = self.semantics(node, kind)
        return ok

    def value(self, a: NumberArg | StringList | TagArg, want: str, what: str) -> object:
        names = {"s": "a string", "l": "a string list", "n": "a number"}
        if want == "n" and isinstance(a, NumberArg):
            return a.value
        if want == "s" and isinstance(a, StringList) and not a.bracketed:
            return self.string(a.items[0].value, a.line, a.column)
        if want == "l" and isinstance(a, StringList):
            return [self.string(s.value, s.line, s.column) for s in a.items]
        self.err(a.line, a.column, f"{what} must be {names[want]}")
        return None

    def semantics(self, node: Node, kind: str) -> bool:
        """Checks that need the argument values (each cites its RFC)."""
        ok = True
        n = node.name
        if n == "set":
            name = str(node.pos[0])
            if not _VARNAME.match(name) or ("." in name and not name.lower().startswith("global.")):
                self.err(node.line, node.column, f"invalid variable name '{name}'")  # RFC 5229 §3
                ok = False
            elif len(name) > MAX_VARIABLE_NAME:
                self.err(node.line, node.column, f"variable name '{name[:20]}...' is too long")
                ok = False
            else:
                self.declared.add(name.lower())
                if len(self.declared) == MAX_VARIABLES + 1:  # RFC 5229 §6: reported once
                    self.err(node.line, node.column, f"more than {MAX_VARIABLES} variables declared")
                    ok = False
        if n in ("date", "currentdate"):
            part = str(node.pos[-2]).lower()
            if part not in _DATE_PARTS:  # RFC 5260 §4.2
                self.err(node.line, node.column, f"unknown date part '{node.pos[-2]}'")
                ok = False
        if n in ("header", "address", "date", "deleteheader") and node.tags.get("last") and \
                "index" not in node.tags:
            self.err(node.line, node.column,  # RFC 5260 §6
                     f"the :last tag for the {n} {kind} cannot be specified without the :index tag")
            ok = False
        if "index" in node.tags and isinstance(node.tags["index"], int) and node.tags["index"] < 1:
            self.err(node.line, node.column, "the :index value must be 1 or more")
            ok = False
        mt = node.tags.get("match")
        if isinstance(mt, tuple) and mt[0] in ("contains", "matches", "regex") and \
                node.tags.get("comparator") == "i;ascii-numeric":
            # RFC 4790 §9.1: i;ascii-numeric offers equality and ordering only (RFC 5228 §2.7.3)
            self.err(node.line, node.column, f"comparator 'i;ascii-numeric' does not support :{mt[0]}")
            return False
        if isinstance(mt, tuple) and mt[0] == "regex" and node.pos:
            cmp = str(node.tags.get("comparator", "i;ascii-casemap"))
            keys = node.pos[-1] if isinstance(node.pos[-1], list) else [node.pos[-1]]
            for key in keys:
                if self.has("variables") and "${" in str(key):
                    continue  # known only at run time
                try:
                    regex_compile(str(key), cmp)
                except MatchError as e:  # draft-ietf-sieve-regex-01 §3: an invalid regex is an error
                    self.err(node.line, node.column, str(e))
                    ok = False
        if n == "vacation":
            for key in ("days", "seconds"):
                if key in node.tags:
                    node.tags["period"] = (key, node.tags[key])
        if n in ("addheader", "deleteheader"):
            field_name = str(node.pos[0])
            literal = not self.has("variables") or "${" not in field_name
            if literal and not re.fullmatch(r"[!-9;-~]+", field_name):  # RFC 5322 §3.6.8 field-name
                self.err(node.line, node.column, f"specified field name '{field_name}' is invalid")
                ok = False
            if n == "addheader" and len(node.pos) > 1 and "\0" in str(node.pos[1]):
                self.err(node.line, node.column, f"specified value '{node.pos[1]!s}' is invalid")
                ok = False  # RFC 5293 §4: a NUL can never be part of a header field
        return ok


def compile_script(source: str | bytes, name: str = "script", *,
                   specs: Mapping[str, Spec] = SPECS,
                   capabilities: frozenset[str] = CAPABILITIES) -> Script:
    """Parse and validate a script; raises CompileError with every error found (syntax errors, or
    when the syntax is sound, validation errors)."""
    try:
        tree = parse(source)
    except SieveSyntaxError as e:
        raise CompileError([SieveError(x.line, x.column, x.message) for x in e.errors]) from None
    v = _Validator(specs, capabilities)
    commands = v.commands(tree, True)
    if v.errors:
        raise CompileError(sorted(v.errors, key=lambda e: (e.line, e.column)))
    return Script(name, frozenset(v.requires), commands)
