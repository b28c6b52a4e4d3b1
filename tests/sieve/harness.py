"""Pigeonhole's ``vnd.dovecot.testsuite`` extension over postier's Sieve interpreter, to run its .svtest files.

The semantics follow Pigeonhole's harness (``pigeonhole/src/testsuite/*.c``, read, not copied): a .svtest
is itself a Sieve script; ``test "name" {...}`` runs a block and ``test_fail`` fails it; the script's own
actions and those of ``test_script_run`` go into one "testsuite result" that ``test_result_action``
inspects and ``test_result_execute`` executes into an in-memory mail store (``test_message :folder``) and
an outgoing SMTP list (``test_message :smtp``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from postier.sieve.interpreter import (
    Copy,
    Handler, TestHandler, _Return, _Stop,
    Action, Environment, Interpreter, Limits, Message, Result, SieveRuntimeError, parse_address,
)
from postier.sieve.redirect import envelope_sender, is_loop, redirected_message
from postier.sieve.spamtest import ScoreSource, spam_value, virus_value
from postier.sieve.match import compare_relational, match_value
from postier.sieve.vacation import MemoryVacationStore, compose, decide, record
from postier.sieve.validate import _MATCH, CAPABILITIES, SPECS, CompileError, Node, Script, Spec, compile_script

__all__ = ["Suite", "conformance_dir"]


def conformance_dir() -> Path | None:
    """``<repo>/../shared/conformance``, else $POSTIER_CONFORMANCE_DIR, else /work/shared/conformance."""
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / ".." / "shared" / "conformance",
                      Path(os.environ.get("POSTIER_CONFORMANCE_DIR", "/nonexistent")),
                      Path("/work/shared/conformance")):
        if (candidate / "pigeonhole" / "tests").is_dir():
            return candidate.resolve()
    return None


_IDX: dict[str, tuple[str, str | None, str | None]] = {"index": ("n", None, None)}
TESTSUITE_SPECS: dict[str, Spec] = {
    "test": Spec(False, ("vnd.dovecot.testsuite",), (("s",),), block=True),
    "test_fail": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_set": Spec(False, ("vnd.dovecot.testsuite",), (("s", "s"),)),
    "test_config_set": Spec(False, ("vnd.dovecot.testsuite",), (("s", "s"),)),
    "test_config_unset": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_config_reload": Spec(False, ("vnd.dovecot.testsuite",), ((),),
                               {"extension": ("s", None, None)}),
    "test_result_reset": Spec(False, ("vnd.dovecot.testsuite",)),
    "test_result_print": Spec(False, ("vnd.dovecot.testsuite",)),
    "test_message_print": Spec(False, ("vnd.dovecot.testsuite",)),
    "test_message": Spec(False, ("vnd.dovecot.testsuite",), (("n",), ("s", "n")), {
        "smtp": ("", None, "src"), "folder": ("", None, "src")}, both=True),
    "test_mailbox_create": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_mailbox_delete": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_binary_load": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_binary_save": Spec(False, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_script_compile": Spec(True, ("vnd.dovecot.testsuite",), (("s",),)),
    "test_script_run": Spec(True, ("vnd.dovecot.testsuite",), ((),), {"append_result": ("", None, None)}),
    "test_multiscript": Spec(True, ("vnd.dovecot.testsuite",), (("l",),)),
    "test_error": Spec(True, ("vnd.dovecot.testsuite",), (("l",),), {**_MATCH, **_IDX}),
    "test_result_action": Spec(True, ("vnd.dovecot.testsuite",), (("l",),), {**_MATCH, **_IDX}),
    "test_result_execute": Spec(True, ("vnd.dovecot.testsuite",)),
}
ALL_SPECS = {**SPECS, **TESTSUITE_SPECS}
ALL_CAPS = CAPABILITIES | {"vnd.dovecot.testsuite"}


class _TestFailed(Exception):
    pass


@dataclass
class Suite:
    path: Path
    failures: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    mailstore: dict[str, list[Message]] = field(default_factory=lambda: {"INBOX": []})
    smtp: list[tuple[str, str, bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    compiled: Script | None = None
    binaries: dict[str, Script] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    result: Result = field(default_factory=Result)
    result_message: Message | None = None
    executed: bool = False
    done: dict[int, Action] = field(default_factory=dict)  # executed actions, kept alive so ids stay unique
    vacation_store: MemoryVacationStore = field(default_factory=MemoryVacationStore)
    duplicates: set[str] = field(default_factory=set)

    def run(self) -> list[str]:
        source = self.path.read_bytes()
        try:
            script = compile_script(source, self.path.stem, specs=ALL_SPECS, capabilities=ALL_CAPS)
        except CompileError as e:
            return [f"compile: {err}" for err in e.errors]
        env = self.environment()
        message = Message(b"From: sender@example.com\r\nTo: recipient@example.com\r\n"
                          b"Subject: Frop\r\n\r\nFrop!\r\n")
        ip = SuiteInterpreter(script, message, env, self.result)
        ip.suite = self
        self.result_message = message
        try:
            ip.block(script.commands)
        except (_Stop, _Return):
            pass
        except SieveRuntimeError as e:
            self.failures.append(f"script error: {e}")
        return self.failures

    def environment(self) -> Environment:
        env = Environment(envelope_from="sender@example.com", envelope_to="recipient@example.com",
                          mailbox_exists=lambda name: name in self.mailstore,
                          load_script=self.load_script, duplicate_seen=lambda k: k in self.duplicates,
                          limits=Limits(max_steps=200_000))
        env.environment.update({"location": "MS", "domain": "example.com", "host": "mail.example.com"})
        return env

    def load_script(self, location: str, name: str) -> Script | None:
        folder = self.path.parent / ("included-global" if location == "global" else "included")
        p = folder / f"{name}.sieve"
        if not p.is_file():
            return None
        try:
            return compile_script(p.read_bytes(), name, specs=ALL_SPECS, capabilities=ALL_CAPS)
        except CompileError as e:
            raise SieveRuntimeError(f"included script {name} failed to compile: {e}") from None

    def reset(self, ip: SuiteInterpreter) -> None:
        self.result = Result()
        ip.result = self.result
        ip.flags = []
        self.result_message = ip.message
        self.executed = False
        self.done.clear()
        self.smtp.clear()

    # -- executing a result -----------------------------------------------------------------------

    def execute(self, ip: SuiteInterpreter) -> bool:
        """test_result_execute: deliver the result into the store and the SMTP list."""
        self.errors = []
        msg = self.result_message or ip.message
        env = ip.env
        ok = True
        actions = self.result.final(env.default_mailbox)
        if self.executed:  # executing again runs only the actions added since (as Pigeonhole does)
            actions = [a for a in self.result.actions if id(a) not in self.done]
        self.executed = True
        for a in actions:
            self.done[id(a)] = a
            if a.kind in ("keep", "store"):
                box = a.target
                if "/" in box or any(not part for part in box.split(".")):
                    self.errors.append(f"failed to store into mailbox '{box}': invalid mailbox name")
                    ok = False
                    continue
                if box not in self.mailstore:
                    if a.create or box == "INBOX":
                        self.mailstore[box] = []
                    else:
                        self.errors.append(f"failed to store into mailbox '{box}': Mailbox doesn't exist")
                        ok = False
                        continue
                copy = Message(bytes(Copy(msg, a.head if a.head is not None else msg.head)))
                copy.flags = list(a.flags or ())  # type: ignore[attr-defined]
                self.mailstore[box].append(copy)
            elif a.kind == "redirect":
                cfg = self.config
                user = cfg.get("sieve_user_email") or env.envelope_to
                if is_loop(msg, user) or is_loop(msg, env.envelope_to):
                    continue  # a loop: not redirected again (the implicit keep stays)
                frm = envelope_sender(cfg.get("sieve_redirect_envelope_from", "sender"), env.envelope_from,
                                      env.envelope_to, env.orig_to, cfg.get("sieve_user_email"))
                edited = bytes(Copy(msg, a.head if a.head is not None else msg.head))
                self.smtp.append((frm, a.target, redirected_message(edited, user)))
            elif a.kind in ("reject", "ereject"):
                body = (f"From: Postmaster <postmaster@example.com>\r\nTo: <{env.envelope_from}>\r\n"
                        f"Subject: Automatically rejected mail\r\nAuto-Submitted: auto-replied (rejected)\r\n"
                        f"\r\n{a.target}\r\n").encode()
                if env.envelope_from.strip("<> "):  # never to the null sender
                    self.smtp.append(("", env.envelope_from, body))
            elif a.kind == "vacation" and a.vacation is not None:
                cfg = self.config
                user = cfg.get("sieve_user_email", "")
                own = [user] if user else []
                if cfg.get("sieve_vacation_use_original_recipient") == "yes" and env.orig_to:
                    own.append(env.orig_to)
                if cfg.get("sieve_vacation_check_recipient") == "no" or \
                        cfg.get("sieve_vacation_dont_check_recipient") == "yes":
                    own += _recipients(msg)
                d = decide(a.vacation, msg, env.envelope_from, env.envelope_to, own,
                           MemoryVacationStore())  # like Pigeonhole's harness: no reply memory
                if d.reply:
                    record(a.vacation, d, self.vacation_store)
                    reply = compose(a.vacation, msg, env.envelope_from, d.matched or user or env.envelope_to,
                                    ignore_envelope=cfg.get("sieve_vacation_to_header_ignore_envelope") == "yes",
                                    default_subject=cfg.get("sieve_vacation_default_subject"),
                                    subject_template=cfg.get("sieve_vacation_default_subject_template"))
                    frm = env.envelope_to if cfg.get("sieve_vacation_send_from_recipient") == "yes" else ""
                    self.smtp.append((frm, env.envelope_from, reply))
        for key, _ in self.result.duplicate_marks:
            self.duplicates.add(key)
        return ok


def _recipients(msg: Message) -> list[str]:
    out = []
    for name in ("to", "cc", "bcc"):
        for raw in msg.values(name):
            addr = parse_address(raw.decode("utf-8", "replace"))
            if addr:
                out.append(f"{addr[0]}@{addr[1]}")
    return out


class SuiteInterpreter(Interpreter):
    suite: Suite
    commands = dict(Interpreter.commands)
    tests = dict(Interpreter.tests)

    def namespace_variable(self, name: str, literal: str) -> str:
        if name == "tst.path":
            return ""
        return super().namespace_variable(name, literal)


def _cmd(name: str) -> Callable[[Handler], Handler]:
    def deco(f: Handler) -> Handler:
        SuiteInterpreter.commands[name] = f
        return f
    return deco


def _tst(name: str) -> Callable[[TestHandler], TestHandler]:
    def deco(f: TestHandler) -> TestHandler:
        SuiteInterpreter.tests[name] = f
        return f
    return deco


def _suite(ip: Interpreter) -> Suite:
    assert isinstance(ip, SuiteInterpreter)
    return ip.suite


@_cmd("test")
def _test(ip: Interpreter, node: Node) -> None:
    suite = _suite(ip)
    name = ip.s(node, 0)
    try:
        ip.block(node.block or [])
    except _TestFailed as e:
        suite.failures.append(f"{name}: {e}")
        return
    except SieveRuntimeError as e:
        suite.failures.append(f"{name}: runtime error: {e}")
        return
    suite.passed.append(name)


@_cmd("test_fail")
def _test_fail(ip: Interpreter, node: Node) -> None:
    raise _TestFailed(ip.s(node, 0))


def _first_address(message: Message, names: tuple[str, ...]) -> str | None:
    for name in names:
        for raw in message.values(name):
            addr = parse_address(raw.decode("utf-8", "replace"))
            if addr is not None:
                return f"{addr[0]}@{addr[1]}" if addr[1] else addr[0]
    return None


def _set_message(ip: Interpreter, message: Message) -> None:
    """A new message also sets the envelope from its header, as Pigeonhole's harness does."""
    ip.message = message
    _suite(ip).result_message = message
    to = _first_address(message, ("envelope-to", "to")) or "recipient@example.com"
    ip.env.envelope_to = ip.env.orig_to = to
    ip.env.envelope_from = _first_address(message, ("return-path", "sender", "from")) or "sender@example.com"


@_cmd("test_set")
def _test_set(ip: Interpreter, node: Node) -> None:
    what, value = ip.s(node, 0).lower(), ip.s(node, 1)
    if what == "message":
        _set_message(ip, Message(value.encode("utf-8")))
    elif what == "envelope.from":
        ip.env.envelope_from = value
    elif what == "envelope.to":
        ip.env.envelope_to = value
    elif what == "envelope.orig_to":
        ip.env.orig_to = value
    elif what == "envelope.auth":
        ip.env.auth = value
    else:
        raise SieveRuntimeError(f"unknown testsuite object {what}")


@_cmd("test_config_set")
def _config_set(ip: Interpreter, node: Node) -> None:
    _suite(ip).config[ip.s(node, 0)] = ip.s(node, 1)


@_cmd("test_config_unset")
def _config_unset(ip: Interpreter, node: Node) -> None:
    _suite(ip).config.pop(ip.s(node, 0), None)


@_cmd("test_config_reload")
def _config_reload(ip: Interpreter, node: Node) -> None:
    cfg = _suite(ip).config
    ip.env.subaddress_delimiter = cfg.get("recipient_delimiter", "+")
    limits = {"max_variable_size": "sieve_variables_max_variable_size", "max_variables": "sieve_variables_max_scope_size",
              "max_include_depth": "sieve_include_max_nesting_depth", "max_includes": "sieve_include_max_includes"}
    ip.env.limits = dataclasses.replace(ip.env.limits, **{
        k: int(cfg[v]) for k, v in limits.items() if cfg.get(v, "").isdigit()})
    ip.limits = ip.env.limits
    names = cfg.get("sieve_editheader_header", "").split()
    ip.env.forbid_add = frozenset(n.lower() for n in names
                                  if cfg.get(f"sieve_editheader_header/{n}/forbid_add") == "yes")
    ip.env.forbid_delete = frozenset(n.lower() for n in names
                                     if cfg.get(f"sieve_editheader_header/{n}/forbid_delete") == "yes")
    spam, virus = _score_source(cfg, "spamtest"), _score_source(cfg, "virustest")
    ip.env.spamtest = lambda message, percent: spam_value(message, spam, percent)
    ip.env.virustest = lambda message: virus_value(message, virus)


def _score_source(cfg: dict[str, str], kind: str) -> ScoreSource:
    prefix = f"sieve_{kind}_"
    max_value = cfg.get(prefix + "score_max_value")
    texts = {int(k.rsplit("/", 1)[1]): v for k, v in cfg.items()
             if k.startswith(prefix + "text_value/") and k.rsplit("/", 1)[1].isdigit()}
    return ScoreSource(status_header=cfg.get(prefix + "status_header", ""),
                       status_type=cfg.get(prefix + "status_type", "score"),
                       max_header=cfg.get(prefix + "score_max_header", ""),
                       max_value=float(max_value) if max_value else None, text_values=texts)


@_cmd("test_result_reset")
def _result_reset(ip: Interpreter, node: Node) -> None:
    _suite(ip).reset(ip)  # type: ignore[arg-type]


@_cmd("test_result_print")
def _noop(ip: Interpreter, node: Node) -> None:
    return


SuiteInterpreter.commands["test_message_print"] = _noop


@_cmd("test_mailbox_create")
def _mailbox_create(ip: Interpreter, node: Node) -> None:
    _suite(ip).mailstore.setdefault(ip.s(node, 0), [])


@_cmd("test_mailbox_delete")
def _mailbox_delete(ip: Interpreter, node: Node) -> None:
    _suite(ip).mailstore.pop(ip.s(node, 0), None)


@_cmd("test_binary_save")
def _binary_save(ip: Interpreter, node: Node) -> None:
    suite = _suite(ip)
    if suite.compiled is None:
        raise _TestFailed("no script compiled to save")
    suite.binaries[ip.s(node, 0)] = suite.compiled


@_cmd("test_binary_load")
def _binary_load(ip: Interpreter, node: Node) -> None:
    suite = _suite(ip)
    script = suite.binaries.get(ip.s(node, 0))
    if script is None:
        raise _TestFailed(f"no binary {ip.s(node, 0)}")
    suite.compiled = script


def _message(ip: Interpreter, node: Node) -> bool:
    suite = _suite(ip)
    index = int(str(node.pos[-1]))
    if node.tags.get("smtp"):
        if index >= len(suite.smtp):
            return False
        frm, to, raw = suite.smtp[index]
        ip.message = Message(raw)
        ip.env.envelope_from, ip.env.envelope_to = frm, to
    else:
        box = suite.mailstore.get(ip.s(node, 0))
        if box is None or index >= len(box):
            return False
        _set_message(ip, box[index])
        ip.flags = list(getattr(box[index], "flags", []))
    suite.result_message = ip.message
    return True


@_cmd("test_message")
def _message_cmd(ip: Interpreter, node: Node) -> None:
    if not _message(ip, node):
        raise _TestFailed("no such message")


SuiteInterpreter.tests["test_message"] = _message


@_tst("test_script_compile")
def _script_compile(ip: Interpreter, node: Node) -> bool:
    suite = _suite(ip)
    path = suite.path.parent / ip.s(node, 0)
    suite.errors = []
    suite.compiled = None
    try:
        suite.compiled = compile_script(path.read_bytes(), path.stem, specs=ALL_SPECS, capabilities=ALL_CAPS)
        suite.compiled.location = "testsuite"  # not in included/: same-named includes are not itself
    except CompileError as e:  # Pigeonhole ends its error list with a summary line
        suite.errors = [e.message for e in e.errors] + ["validation failed"]
        return False
    except OSError as e:
        suite.errors = [str(e)]
        return False
    return True


@_tst("test_script_run")
def _script_run(ip: Interpreter, node: Node) -> bool:
    suite = _suite(ip)
    if suite.compiled is None:
        return False
    if not node.tags.get("append_result"):
        suite.reset(ip)  # type: ignore[arg-type]
    suite.executed = False
    msg = Message(ip.message.raw)
    sub = SuiteInterpreter(suite.compiled, msg, ip.env, suite.result)
    sub.suite = suite
    sub.flags = list(suite.result.implicit_flags)
    res = sub.run()
    suite.result_message = msg
    suite.errors = ([res.error] if res.error else []) + res.warnings
    return res.error is None


@_tst("test_multiscript")
def _multiscript(ip: Interpreter, node: Node) -> bool:
    raise SieveRuntimeError("test_multiscript is not supported")


def _list_test(ip: Interpreter, node: Node, values: list[str]) -> bool:
    keys = ip.sl(node.pos[0])
    mt = node.tags.get("match", ("is", None))
    assert isinstance(mt, tuple)
    cmp = str(node.tags.get("comparator", "i;ascii-casemap"))
    idx = node.tags.get("index")
    if mt[0] == "count":
        return any(compare_relational(cmp, str(mt[1]), str(len(values)), k) for k in keys)
    if isinstance(idx, int):
        values = values[idx - 1 : idx] if idx >= 1 else []
    return any(match_value(str(mt[0]), cmp, mt[1], v, k) is not None for v in values for k in keys)


@_tst("test_error")
def _error(ip: Interpreter, node: Node) -> bool:
    return _list_test(ip, node, _suite(ip).errors)


@_tst("test_result_action")
def _result_action(ip: Interpreter, node: Node) -> bool:
    return _list_test(ip, node, [a.kind for a in _suite(ip).result.actions])


@_tst("test_result_execute")
def _result_execute(ip: Interpreter, node: Node) -> bool:
    return _suite(ip).execute(ip)  # type: ignore[arg-type]


