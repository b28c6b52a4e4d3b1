"""The CLI imports only the module that adds the command it runs (`cli.EXTRA_COMMANDS`): the names
there are what each module registers, and a command line finds its word."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from postier import cli


def test_the_table_names_what_each_module_registers() -> None:
    for modname, names in cli.EXTRA_COMMANDS.items():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        importlib.import_module(modname).register(sub)
        assert tuple(sorted(sub.choices)) == tuple(sorted(names)), modname
        assert not set(names) & set(cli.CORE_COMMANDS), modname
    every = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(every) == set(cli.CORE_COMMANDS) | {n for names in cli.EXTRA_COMMANDS.values() for n in names}


@pytest.mark.parametrize(("argv", "word"), [
    (["domain", "list"], "domain"),
    (["--config", "x.toml", "user", "add", "a@b"], "user"),
    (["-c", "x.toml", "queue", "list"], "queue"),
    (["--config=x.toml", "cluster", "status"], "cluster"),
    (["-cx.toml", "status"], "status"),
    (["--help"], None),
    (["--version"], None),
    ([], None),
])
def test_the_command_word(argv: list[str], word: str | None) -> None:
    assert cli._command_word(argv) == word


def test_a_command_imports_its_module_alone() -> None:
    code = ("import sys; from postier import cli; cli.build_parser('domain'); "
            "print(sorted(m for m in cli.EXTRA_COMMANDS if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = ("import sys; from postier import cli; cli.build_parser('dkim'); "
            "print(sorted(m for m in cli.EXTRA_COMMANDS if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['postier.mailauth.cli']"


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "postier", "--help"], capture_output=True, text=True, check=True).stdout
    for names in cli.EXTRA_COMMANDS.values():
        for name in names:
            assert name in out
