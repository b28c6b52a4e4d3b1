"""A webmail user's preferences and the Sieve script its settings page writes (RFC 5228, RFC 5230,
RFC 5232): signatures per identity, senders whose remote content is shown, and a simple filter form
(header contains X -> file into a folder / mark read) plus vacation, turned into one Sieve script.

Preferences are one small JSON file under the user's containment-checked home (``webmail/prefs.json``),
replaced durably (`durable.write_file`), read-modify-written under a per-user lock so that two
sessions never lose each other's change. The generated script carries the form's own state on its
first line (a Sieve comment), so the form can show it again; a script written by hand (ManageSieve or
the raw editor) is left alone until the form is saved again.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import durable
from ..message.types import User

__all__ = ["MARKER", "Prefs", "PrefsStore", "Rule", "Rules", "Vacation", "generate", "read_rules"]

MARKER = "# postier-webmail-rules: "
MAX_PREFS = 256 * 1024
MAX_SIGNATURE = 2000
MAX_REMOTE_SENDERS = 1000
MAX_RULES = 50
MAX_VALUE = 200
FIELDS = ("from", "to", "subject")
ACTIONS = ("fileinto", "read")


@dataclass
class Prefs:
    signatures: dict[str, str] = field(default_factory=dict)  # identity address -> signature text
    remote_senders: list[str] = field(default_factory=list)  # lower-case sender addresses
    rich: bool = False  # compose in rich text by default

    @classmethod
    def from_json(cls, data: Any) -> Prefs:
        p = cls()
        if not isinstance(data, dict):
            return p
        sigs = data.get("signatures")
        if isinstance(sigs, dict):
            p.signatures = {str(k): str(v)[:MAX_SIGNATURE] for k, v in sigs.items() if isinstance(v, str)}
        senders = data.get("remote_senders")
        if isinstance(senders, list):
            p.remote_senders = [str(s).lower() for s in senders if isinstance(s, str)][:MAX_REMOTE_SENDERS]
        p.rich = data.get("rich") is True
        return p

    def to_json(self) -> dict[str, Any]:
        return {"signatures": self.signatures, "remote_senders": self.remote_senders, "rich": self.rich}


class PrefsStore:
    """Every user's preferences under the mail root (blocking: callers run it in a thread)."""

    def __init__(self, mail_root: Path) -> None:
        self.mail_root = mail_root
        self._locks = tuple(threading.Lock() for _ in range(64))

    def _path(self, user: User) -> Path:
        return user.home(self.mail_root) / "webmail" / "prefs.json"  # home() checks containment

    def _lock(self, user: User) -> threading.Lock:
        return self._locks[hash(user.address) % len(self._locks)]

    def _read(self, user: User) -> Prefs:
        try:
            data = self._path(user).read_bytes()[:MAX_PREFS]
            return Prefs.from_json(json.loads(data))
        except (OSError, ValueError):
            return Prefs()

    def get(self, user: User) -> Prefs:
        with self._lock(user):
            return self._read(user)

    def update(self, user: User, change: Any) -> Prefs:
        """Apply `change(prefs)` and store the result durably, one change at a time per user."""
        with self._lock(user):
            p = self._read(user)
            change(p)
            data = json.dumps(p.to_json(), ensure_ascii=False).encode()
            if len(data) > MAX_PREFS:
                raise ValueError("preferences too large")
            durable.write_file(self._path(user), data)
            return p


@dataclass
class Rule:
    field: str  # "from" | "to" | "subject"
    value: str  # contains this (case-insensitively)
    action: str  # "fileinto" | "read"
    folder: str = ""


@dataclass
class Vacation:
    enabled: bool = False
    subject: str = ""
    body: str = ""
    days: int = 7
    addresses: list[str] = field(default_factory=list)


@dataclass
class Rules:
    rules: list[Rule] = field(default_factory=list)
    vacation: Vacation = field(default_factory=Vacation)

    def to_json(self) -> dict[str, Any]:
        v = self.vacation
        return {"rules": [[r.field, r.value, r.action, r.folder] for r in self.rules],
                "vacation": {"enabled": v.enabled, "subject": v.subject, "body": v.body, "days": v.days,
                             "addresses": v.addresses}}

    @classmethod
    def from_json(cls, data: Any) -> Rules:
        out = cls()
        if not isinstance(data, dict):
            return out
        for r in data.get("rules", [])[:MAX_RULES] if isinstance(data.get("rules"), list) else []:
            if isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r) \
                    and r[0] in FIELDS and r[2] in ACTIONS:
                out.rules.append(Rule(r[0], r[1], r[2], r[3]))
        v = data.get("vacation")
        if isinstance(v, dict):
            days = v.get("days")
            addrs = v.get("addresses")
            out.vacation = Vacation(v.get("enabled") is True, str(v.get("subject", "")), str(v.get("body", "")),
                                    days if isinstance(days, int) else 7,
                                    [str(a) for a in addrs] if isinstance(addrs, list) else [])
        return out


def _quote(s: str) -> str:
    """A Sieve quoted string (RFC 5228 §2.4.2): backslash and double quote escaped; line ends as CRLF."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\r\n") + '"'


def generate(rules: Rules) -> str:
    """The Sieve script for the form: vacation first (it answers whatever the rules then do), then
    each rule in order."""
    needs: list[str] = []
    lines: list[str] = []
    v = rules.vacation
    if v.enabled:
        needs.append("vacation")
        args = [f":days {max(1, min(v.days, 90))}"]  # RFC 5230 §4.1
        if v.subject:
            args.append(f":subject {_quote(v.subject)}")
        if v.addresses:
            args.append(":addresses [" + ", ".join(_quote(a) for a in v.addresses) + "]")  # RFC 5230 §4.5
        lines.append(f"vacation {' '.join(args)} {_quote(v.body or 'I am away.')};")
    for r in rules.rules:
        test = f"header :contains {_quote(r.field)} {_quote(r.value)}"  # RFC 5228 §5.7
        if r.action == "fileinto":
            needs.append("fileinto")
            lines.append(f"if {test} {{ fileinto {_quote(r.folder)}; stop; }}")  # RFC 5228 §4.1
        else:
            needs.append("imap4flags")
            lines.append(f'if {test} {{ addflag "\\\\Seen"; }}')  # RFC 5232 §3.2
    head = [MARKER + json.dumps(rules.to_json(), ensure_ascii=True)]
    if needs:
        head.append("require [" + ", ".join(_quote(n) for n in dict.fromkeys(needs)) + "];")
    return "\r\n".join(head + lines) + "\r\n"


def read_rules(script: bytes) -> Rules | None:
    """The form's state from a script it generated, or None for a script written by hand (or edited)."""
    text = script.decode("utf-8", "replace")
    first, _, _rest = text.partition("\r\n")
    if not first.startswith(MARKER):
        return None
    try:
        rules = Rules.from_json(json.loads(first[len(MARKER):]))
    except ValueError:
        return None
    return rules if generate(rules) == text else None
