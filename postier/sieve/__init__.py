"""Sieve mail filtering (RFC 5228 and extensions): grammar, upload-time validation, interpreter, vacation."""

from .grammar import SieveSyntaxError, parse
from .interpreter import Action, Environment, Interpreter, Limits, Message, Result, run
from .validate import CAPABILITIES, CompileError, Script, SieveError, compile_script

__all__ = [
    "CAPABILITIES", "Action", "CompileError", "Environment", "Interpreter", "Limits", "Message", "Result",
    "Script", "SieveError", "SieveSyntaxError", "compile_script", "parse", "run",
]
