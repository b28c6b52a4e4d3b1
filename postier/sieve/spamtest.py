"""spamtest/spamtestplus/virustest values (RFC 5235 §3) from a scanner's header, configured like Pigeonhole.

A scanner (SpamAssassin, rspamd, an AV milter, postier's own checks) leaves its verdict in a header;
``ScoreSource`` says which header, an optional regular expression whose first group is the value, how
to read it (``score``: a number against a maximum; ``strlen``: the length of e.g. "*****"; ``text``:
one of the listed phrases) and the maximum (a fixed number or another header). RFC 5235 values: "0"
not tested; spamtest 1 (clearly not spam) to 10 (certainly spam); :percent 0 to 100; virustest 1
(clean) to 5 (infected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postier.message.mime import decode_header_text

from .interpreter import Message

__all__ = ["ScoreSource", "spam_value", "virus_value"]


@dataclass(frozen=True, slots=True)
class ScoreSource:
    status_header: str = ""  # "Name" or "Name:regex"
    status_type: str = "score"  # score, strlen, text
    max_header: str = ""  # "Name:regex" giving the maximum, or ""
    max_value: float | None = None
    text_values: dict[int, str] = field(default_factory=dict)


def _header(message: Message, spec: str) -> str | None:
    """The value named by "Name" or the first group of "Name:regex" (None when absent or no match)."""
    name, sep, rx = spec.partition(":")
    values = message.values(name.strip())
    if not values:
        return None
    value = decode_header_text(values[0]).strip()
    if not sep:
        return value
    try:
        m = re.search(rx.lstrip(), value[:4096])
    except re.error:
        return None
    if m is None:
        return None
    return m.group(1) if m.groups() else m.group(0)


def _ratio(message: Message, src: ScoreSource) -> float | None:
    """The verdict as a fraction of the maximum (None: not tested); text verdicts give their level."""
    raw = _header(message, src.status_header) if src.status_header else None
    if raw is None:
        return None
    if src.status_type == "text":
        return None
    if src.status_type == "strlen":
        value = float(len(raw))
    else:
        try:
            value = float(raw)
        except ValueError:
            return None
    maximum = src.max_value
    if src.max_header:
        got = _header(message, src.max_header)
        try:
            maximum = float(got) if got is not None else None
        except ValueError:
            maximum = None
    if maximum is None or maximum <= 0:
        return None
    return min(max(value / maximum, 0.0), 1.0)


def _text_level(message: Message, src: ScoreSource) -> int | None:
    raw = _header(message, src.status_header) if src.status_header else None
    if raw is None:
        return None
    for level, phrase in sorted(src.text_values.items()):
        if raw.strip().lower() == phrase.strip().lower():
            return level
    return None


def spam_value(message: Message, src: ScoreSource, percent: bool) -> str:
    """RFC 5235 §3.2 (spamtest) and §3.3 (:percent, spamtestplus)."""
    if src.status_type == "text":
        level = _text_level(message, src)
        if level is None:
            return "0"
        return str(round((level - 1) * 100 / 9)) if percent else str(level)
    ratio = _ratio(message, src)
    if ratio is None:
        return "0"
    if percent:
        return str(round(ratio * 100))
    return str(min(1 + int(ratio * 9), 10))


def virus_value(message: Message, src: ScoreSource) -> str:
    """RFC 5235 §3.4: 0 not tested, 1 clean ... 5 infected."""
    if src.status_type == "text":
        level = _text_level(message, src)
        return "0" if level is None else str(level)
    ratio = _ratio(message, src)
    if ratio is None:
        return "0"
    return str(min(1 + int(ratio * 4), 5))
