"""Sieve lexer and parser (RFC 5228 §8): script text in, a syntax tree out, errors with line and column.

Sans-IO and bounded: the whole script is given as one buffer (its size capped by the caller), nesting of
blocks and tests is limited to ``MAX_NESTING``, and a script holds at most ``MAX_NODES`` commands, tests
and arguments. Parsing knows no extension: which commands, tests and tags exist is checked afterwards by
``postier.sieve.validate``.

Written here rather than taken from sievelib (judged at 1.4): it is a client-side library, a parser
and script generator with no interpreter; ``Parser.parse()`` returns a bool and leaves one message
string ("line N: parsing error: ...", no column, one error only); encoded-character (RFC 5228
§2.4.2.4) is not supported and date/index and mailbox only partly; its command set is a global
registry extended by subclassing. A server needs every error with line and column for ManageSieve,
validation per required extension, a bounded total parser, and a tree an interpreter can run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_NESTING", "MAX_NODES", "Argument", "Command", "NumberArg", "SieveSyntaxError", "StringArg",
    "StringList", "TagArg", "Test", "parse",
]

MAX_NESTING = 32
MAX_NODES = 100_000
_QUANTIFIERS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # RFC 5228 §2.4.1


MAX_SYNTAX_ERRORS = 20


class SieveSyntaxError(Exception):
    """A script that does not follow the grammar; ``line`` and ``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.message = message
        self.line = line
        self.column = column
        self.errors: list[SieveSyntaxError] = [self]  # every error found, this one first


class _Fatal(SieveSyntaxError):
    """A bound was exceeded: parsing stops here, no recovery."""


@dataclass(frozen=True, slots=True)
class StringArg:
    value: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class StringList:
    """A string-list (RFC 5228 §2.4.2.1); ``bracketed`` is False for a single bare string."""

    items: tuple[StringArg, ...]
    bracketed: bool
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class NumberArg:
    value: int
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class TagArg:
    name: str  # without the colon, lower-cased (RFC 5228 §2.6.2: tags are case-insensitive)
    line: int
    column: int


Argument = StringList | NumberArg | TagArg


@dataclass(frozen=True, slots=True)
class Test:
    name: str  # lower-cased (RFC 5228 §2.9: identifiers are case-insensitive)
    args: tuple[Argument, ...]
    tests: tuple[Test, ...]
    test_list: bool  # the tests were given as a parenthesised test-list
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: tuple[Argument, ...]
    tests: tuple[Test, ...]
    test_list: bool
    block: tuple[Command, ...] | None  # None when the command ends with ";"
    line: int
    column: int


# -- lexer (RFC 5228 §8.1) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "id", "tag", "num", "str", "punct", "eof"
    text: str
    value: int | str
    line: int
    column: int


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_"


class _Lexer:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.line_start = 0

    def _err(self, msg: str, at: int | None = None) -> SieveSyntaxError:
        pos = self.i if at is None else at
        line = self.s.count("\n", 0, pos) + 1
        col = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        return SieveSyntaxError(msg, line, col)

    def tokens(self) -> list[_Tok]:
        out: list[_Tok] = []
        s, n = self.s, len(self.s)
        while True:
            self._skip_space()
            if len(out) > MAX_NODES:
                raise self._err("script too large")
            start = self.i
            line, col = self.line, start - self.line_start + 1
            if start >= n:
                out.append(_Tok("eof", "", "", line, col))
                return out
            c = s[start]
            if _is_alpha(c):
                j = start + 1
                while j < n and (_is_alpha(s[j]) or s[j].isdigit() and s[j].isascii()):
                    j += 1
                word = s[start:j]
                self.i = j
                if word.lower() == "text" and j < n and s[j] == ":":  # RFC 5228 §8.1 multi-line
                    self.i = j + 1
                    out.append(_Tok("str", word, self._multiline(start), line, col))
                    continue
                out.append(_Tok("id", word, word.lower(), line, col))
            elif c == ":":
                j = start + 1
                if j >= n or not _is_alpha(s[j]):
                    raise self._err("expected a tag identifier after ':'", j)
                while j < n and (_is_alpha(s[j]) or s[j].isdigit() and s[j].isascii()):
                    j += 1
                self.i = j
                out.append(_Tok("tag", s[start:j], s[start + 1 : j].lower(), line, col))
            elif c.isascii() and c.isdigit():
                j = start
                while j < n and s[j].isascii() and s[j].isdigit():
                    j += 1
                value = int(s[start:j])
                if j < n and s[j].upper() in _QUANTIFIERS:  # RFC 5228 §2.4.1
                    value *= _QUANTIFIERS[s[j].upper()]
                    j += 1
                if value > 2**63 - 1:
                    raise self._err("number too large", start)
                self.i = j
                out.append(_Tok("num", s[start:j], value, line, col))
            elif c == '"':
                out.append(_Tok("str", '"', self._quoted(), line, col))
            elif c in "[](){},;":
                self.i = start + 1
                out.append(_Tok("punct", c, c, line, col))
            else:
                raise self._err(f"unexpected character {c!r}")

    def _newline(self, at: int) -> None:
        self.line += 1
        self.line_start = at + 1

    def _skip_space(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c == "\n":
                self._newline(self.i)
                self.i += 1
            elif c in " \t\r":
                self.i += 1
            elif c == "#":  # RFC 5228 §2.3 hash-comment
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j
            elif s.startswith("/*", self.i):  # RFC 5228 §2.3 bracket-comment
                j = s.find("*/", self.i + 2)
                if j < 0:
                    raise self._err("unterminated bracket comment")
                for k in range(self.i, j):
                    if s[k] == "\n":
                        self._newline(k)
                self.i = j + 2
            else:
                return

    def _quoted(self) -> str:
        """RFC 5228 §2.4.2: only \\\\ and \\" are escapes; "\\x" is "x" for any other x."""
        s, n = self.s, len(self.s)
        j = self.i + 1
        out: list[str] = []
        while True:
            if j >= n:
                raise self._err("unterminated string", self.i)
            c = s[j]
            if c == '"':
                self.i = j + 1
                return _crlf("".join(out))
            if c == "\\":
                if j + 1 >= n:
                    raise self._err("unterminated string", self.i)
                c = s[j + 1]
                j += 1
            if c == "\n":
                self._newline(j)
            out.append(c)
            j += 1

    def _multiline(self, start: int) -> str:
        """RFC 5228 §8.1 multi-line: "text:" then blanks, a comment or line end, lines up to "."; a
        line starting ".." loses one dot (dot-stuffing)."""
        s, n = self.s, len(self.s)
        j = self.i
        while j < n and s[j] in " \t":
            j += 1
        if j < n and s[j] == "#":
            j = s.find("\n", j)
            j = n if j < 0 else j
        elif j < n and s[j] == "\r":
            j += 1
        if j >= n or s[j] != "\n":
            raise self._err("expected end of line after 'text:'", j)
        self._newline(j)
        j += 1
        lines: list[str] = []
        while True:
            if j >= n:
                raise self._err("unterminated multi-line string", start)
            k = s.find("\n", j)
            end = n if k < 0 else k
            line = s[j:end]
            body = line[:-1] if line.endswith("\r") else line
            if body == ".":
                if k < 0:
                    self.i = n
                else:
                    self._newline(k)
                    self.i = k + 1
                return "".join(lines)
            if k < 0:
                raise self._err("unterminated multi-line string", start)
            if body.startswith(".."):  # RFC 5228 §8.1: dot-stuffing; ".x" is multiline-dotstart, kept
                body = body[1:]
            lines.append(body + "\r\n")  # RFC 5228 §2.4.2: line ends in strings are CRLF
            self._newline(k)
            j = k + 1


def _crlf(s: str) -> str:
    """A bare LF inside a string is a line end, CRLF (RFC 5228 §2.4.2), as in multi-line strings."""
    return s.replace("\r\n", "\n").replace("\n", "\r\n") if "\n" in s else s


# -- parser (RFC 5228 §8.2) ---------------------------------------------------------------------

class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.k = 0
        self.nodes = 0
        self.errors: list[SieveSyntaxError] = []

    def _fail(self) -> SieveSyntaxError:
        first = self.errors[0]
        first.errors = list(self.errors)
        return first

    def _recover(self) -> None:
        """Skip to the end of the broken command: past its ";" or its whole block, or up to the "}"
        that closes the enclosing block (left for that block to consume)."""
        depth = 0
        while True:
            t = self._peek()
            if t.kind == "eof":
                return
            if t.kind == "punct":
                if t.value == "{":
                    depth += 1
                elif t.value == "}":
                    if depth == 0:
                        return
                    depth -= 1
                    if depth == 0:
                        self._next()
                        return
                elif t.value == ";" and depth == 0:
                    self._next()
                    return
            self._next()

    def _peek(self) -> _Tok:
        return self.toks[self.k]

    def _next(self) -> _Tok:
        t = self.toks[self.k]
        if t.kind != "eof":
            self.k += 1
        return t

    def _count(self, t: _Tok) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Fatal("script too large", t.line, t.column)

    @staticmethod
    def _err(t: _Tok, what: str) -> SieveSyntaxError:
        found = "end of script" if t.kind == "eof" else repr(t.text)
        return SieveSyntaxError(f"expected {what}, found {found}", t.line, t.column)

    def commands(self, depth: int, closing: bool) -> tuple[Command, ...]:
        """commands = *command (RFC 5228 §8.2)."""
        out: list[Command] = []
        while True:
            t = self._peek()
            if t.kind == "eof":
                if closing:
                    raise self._err(t, "'}'")
                return tuple(out)
            if closing and t.kind == "punct" and t.value == "}":
                self._next()
                return tuple(out)
            try:
                out.append(self.command(depth))
            except _Fatal:
                raise
            except SieveSyntaxError as e:  # recover at the end of this command and go on
                self.errors.append(e)
                if len(self.errors) >= MAX_SYNTAX_ERRORS:
                    raise self._fail() from None
                self._recover()

    def command(self, depth: int) -> Command:
        """command = identifier arguments (";" / block) (RFC 5228 §8.2)."""
        t = self._next()
        if t.kind != "id":
            raise self._err(t, "a command")
        self._count(t)
        args, tests, test_list = self.arguments(depth)
        end = self._peek()
        block: tuple[Command, ...] | None = None
        if end.kind == "punct" and end.value == "{":
            self._next()
            if depth + 1 > MAX_NESTING:  # bounded: blocks nest at most MAX_NESTING deep
                raise _Fatal("blocks nested too deeply", end.line, end.column)
            block = self.commands(depth + 1, True)
        elif end.kind == "punct" and end.value == ";":
            self._next()
        else:
            raise self._err(end, "';' or '{'")  # not consumed: recovery sees a "}" that ends a block
        return Command(str(t.value), args, tests, test_list, block, t.line, t.column)

    def arguments(self, depth: int) -> tuple[tuple[Argument, ...], tuple[Test, ...], bool]:
        """arguments = *argument [ test / test-list ] (RFC 5228 §8.2)."""
        args: list[Argument] = []
        while True:
            t = self._peek()
            self._count(t)
            if t.kind == "num":
                self._next()
                args.append(NumberArg(int(t.value), t.line, t.column))
            elif t.kind == "tag":
                self._next()
                args.append(TagArg(str(t.value), t.line, t.column))
            elif t.kind == "str" or (t.kind == "punct" and t.value == "["):
                args.append(self.string_list())
            else:
                break
        t = self._peek()
        if t.kind == "id":
            return tuple(args), (self.test(depth + 1),), False
        if t.kind == "punct" and t.value == "(":
            return tuple(args), self.test_list(depth + 1), True
        return tuple(args), (), False

    def string_list(self) -> StringList:
        """string-list = "[" string *("," string) "]" / string (RFC 5228 §8.2)."""
        t = self._next()
        if t.kind == "str":
            return StringList((StringArg(str(t.value), t.line, t.column),), False, t.line, t.column)
        items: list[StringArg] = []
        while True:
            s = self._next()
            self._count(s)
            if s.kind != "str":
                raise self._err(s, "a string")
            items.append(StringArg(str(s.value), s.line, s.column))
            sep = self._next()
            if sep.kind == "punct" and sep.value == "]":
                return StringList(tuple(items), True, t.line, t.column)
            if not (sep.kind == "punct" and sep.value == ","):
                raise self._err(sep, "',' or ']'")

    def test(self, depth: int) -> Test:
        """test = identifier arguments (RFC 5228 §8.2)."""
        t = self._next()
        if t.kind != "id":
            raise self._err(t, "a test")
        if depth > MAX_NESTING:
            raise _Fatal("tests nested too deeply", t.line, t.column)
        args, tests, test_list = self.arguments(depth)
        return Test(str(t.value), args, tests, test_list, t.line, t.column)

    def test_list(self, depth: int) -> tuple[Test, ...]:
        """test-list = "(" test *("," test) ")" (RFC 5228 §8.2)."""
        self._next()
        out: list[Test] = []
        while True:
            out.append(self.test(depth))
            sep = self._next()
            if sep.kind == "punct" and sep.value == ")":
                return tuple(out)
            if not (sep.kind == "punct" and sep.value == ","):
                raise self._err(sep, "',' or ')'")


def parse(script: str | bytes) -> tuple[Command, ...]:
    """The commands of a script (RFC 5228 §8.2 ``start``); raises SieveSyntaxError only, after
    recovering at each broken command so that ``errors`` lists every syntax error (at most 20)."""
    if isinstance(script, bytes):
        data = script
        try:
            script = data.decode("utf-8")  # RFC 5228 §2.1: scripts are UTF-8
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise SieveSyntaxError("script is not valid UTF-8", line, col) from None
    toks = _Lexer(script).tokens()
    parser = _Parser(toks)
    commands = parser.commands(0, False)
    if parser.errors:
        raise parser._fail()
    return commands
