"""Sieve mail filtering (RFC 5228 and extensions): grammar, upload-time validation, interpreter, vacation.

The names below load on first use (PEP 562), so that `postier sieve ...` and the rest of the command
line start without compiling the interpreter's regular expressions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .grammar import SieveSyntaxError, parse
    from .interpreter import Action, Environment, Interpreter, Limits, Message, Result, run
    from .validate import CAPABILITIES, CompileError, Script, SieveError, compile_script

__all__ = [
    "CAPABILITIES", "Action", "CompileError", "Environment", "Interpreter", "Limits", "Message", "Result",
    "Script", "SieveError", "SieveSyntaxError", "compile_script", "parse", "run",
]

_HOME = {
    "SieveSyntaxError": "grammar", "parse": "grammar",
    "Action": "interpreter", "Environment": "interpreter", "Interpreter": "interpreter", "Limits": "interpreter",
    "Message": "interpreter", "Result": "interpreter", "run": "interpreter",
    "CAPABILITIES": "validate", "CompileError": "validate", "Script": "validate", "SieveError": "validate",
    "compile_script": "validate",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
