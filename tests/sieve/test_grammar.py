"""Sieve grammar and upload-time validation: positions of errors, bounds, and fuzzing (parse or raise
the one error type, never anything else)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.sieve.grammar import MAX_NESTING, Command, SieveSyntaxError, StringList, parse
from postier.sieve.validate import CompileError, compile_script


def test_parse_commands_tests_and_blocks() -> None:
    cmds = parse('require ["fileinto"];\r\nif header :is "Subject" "x" { fileinto "A"; } else { keep; }')
    assert [c.name for c in cmds] == ["require", "if", "else"]
    assert cmds[1].tests[0].name == "header"
    assert cmds[1].block is not None and cmds[1].block[0].name == "fileinto"
    assert (cmds[1].line, cmds[1].column) == (2, 1)


def test_multiline_string_dot_stuffing_and_comments() -> None:
    src = 'set "a" text: # comment\n..one\n.two\nthree\n.\n;\n/* c\n */ keep; # end'
    cmds = parse(src)
    arg = cmds[0].args[1]
    assert isinstance(arg, StringList)
    assert arg.items[0].value == ".one\r\n.two\r\nthree\r\n"
    assert cmds[1].name == "keep" and cmds[1].line == 8


def test_quoted_string_escapes_and_numbers() -> None:
    cmds = parse('x "a\\"b\\\\c\\d" 1K 2M 3G 4;')
    args = cmds[0].args
    assert isinstance(args[0], StringList) and args[0].items[0].value == 'a"b\\cd'
    assert [getattr(a, "value", None) for a in args[1:]] == [1024, 2 << 20, 3 << 30, 4]


@pytest.mark.parametrize(("src", "line", "column"), [
    ("keep", 1, 5),  # missing semicolon at end
    ("if true {\n  keep;\n", 3, 1),  # unterminated block
    ('fileinto "a\n', 1, 10),  # unterminated string
    ("keep;\n  /* never closed", 2, 3),
    ("keep;\nstop @;", 2, 6),
    ('set "a" text:\nno end', 1, 9),
    ("anyof (true,);", 1, 13),
])
def test_syntax_errors_have_line_and_column(src: str, line: int, column: int) -> None:
    with pytest.raises(SieveSyntaxError) as e:
        parse(src)
    assert (e.value.line, e.value.column) == (line, column)


def test_invalid_utf8_is_a_syntax_error() -> None:
    with pytest.raises(SieveSyntaxError) as e:
        parse(b'keep;\nfileinto "\xff";')
    assert e.value.line == 2


@pytest.mark.parametrize(("src", "needle"), [
    ('fileinto "x";', "requires extension 'fileinto'"),
    ('require "nonsense"; keep;', "unsupported sieve capability"),
    ('keep; require "fileinto";', "must be at the top"),
    ('frop;', "unknown command 'frop'"),
    ('if frop { keep; }', "unknown test 'frop'"),
    ('if header :frop "a" "b" { keep; }', "unknown tagged argument ':frop'"),
    ('if header :is :contains "a" "b" { keep; }', "conflicts"),
    ('if header "a" { keep; }', "requires 2 positional"),
    ('if header :comparator "i;ascii-numeric" "a" "b" { keep; }', "unknown comparator"),
    ('require "relational"; if header :value "xx" "a" "b" { keep; }', "invalid relational"),
    ('elsif true { keep; }', "without a preceding if"),
    ('if true keep;', "requires a block"),
    ('keep { stop; }', "does not accept a block"),
    ('require "variables"; set "a b" "c";', "invalid variable name"),
    ('require "date"; if currentdate "nonsense" "1" { keep; }', "unknown date part"),
    ('redirect ["a@b", "c@d"];', "must be a string"),
    ('if size 10 { keep; }', "requires a :over/:under"),
    ('require ["encoded-character", "fileinto"]; fileinto "${unicode:110000}";', "invalid unicode"),
])
def test_validation_errors_found_at_upload(src: str, needle: str) -> None:
    with pytest.raises(CompileError) as e:
        compile_script(src)
    assert any(needle in err.message for err in e.value.errors), e.value.errors


def test_validation_collects_several_errors_in_order() -> None:
    with pytest.raises(CompileError) as e:
        compile_script("frop;\nkeep;\nfriep;\n")
    assert [err.line for err in e.value.errors] == [1, 3]


def test_deep_nesting_refused() -> None:
    deep = "if true { " * (MAX_NESTING + 1) + "keep;" + " }" * (MAX_NESTING + 1)
    with pytest.raises(SieveSyntaxError, match="nested too deeply"):
        parse(deep)
    deep_tests = "if " + "not " * 5000 + "true { keep; }"
    with pytest.raises(SieveSyntaxError, match="nested too deeply"):
        parse(deep_tests)
    ok = "if true { " * MAX_NESTING + "keep;" + " }" * MAX_NESTING
    assert isinstance(parse(ok)[0], Command)


def test_huge_script_bounded() -> None:
    with pytest.raises(SieveSyntaxError, match="too large"):
        parse("keep;" * 200_000)


_TOKENS = ["require", "if", "elsif", "else", "keep", "stop", "fileinto", "header", "address", "allof",
           "anyof", "not", "true", ":is", ":contains", ":matches", ":comparator", "{", "}", "(", ")",
           "[", "]", ",", ";", '"x"', '"a\\"b"', "text:\nline\n.\n", "12K", "#c\n", "/* c */", "\n",
           '"${hex:41}"', '"${1}"', "size", ":over", "vacation", ":days", "set", '"fileinto"']


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_fuzz_token_soup_compiles_or_raises_compile_error(tokens: list[str]) -> None:
    src = " ".join(tokens)
    try:
        compile_script(src)
    except CompileError as e:
        assert all(err.line >= 1 and err.column >= 1 for err in e.errors)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_parse_or_syntax_error(data: bytes) -> None:
    try:
        parse(data)
    except SieveSyntaxError as e:
        assert e.line >= 1 and e.column >= 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='if{}();"\\:[]*?tex\n#/ ', max_size=200))
def test_fuzz_text_compile_or_compile_error(src: str) -> None:
    try:
        compile_script(src)
    except CompileError:
        pass


def test_parser_recovers_and_reports_every_syntax_error() -> None:
    src = "if true {\n  keep\n}\nif true {\n  keep,\n  keep\n}\nkeep;\nif anyof(true,) { }\ndiscard;\n"
    with pytest.raises(SieveSyntaxError) as e:
        parse(src)
    assert [(x.line, x.column) for x in e.value.errors] == [(3, 1), (5, 7), (9, 15)]
    with pytest.raises(CompileError) as c:
        compile_script(src)
    assert [err.line for err in c.value.errors] == [3, 5, 9]
