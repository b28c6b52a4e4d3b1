"""SEARCH criteria as a small tree (RFC 9051 §6.4.4, RFC 3501 §6.4.4, RFC 7162 §3.1.5 MODSEQ, RFC 5032 WITHIN).

The parser lowers the many keywords onto a few node types: FROM/TO/CC/BCC/SUBJECT become
``HeaderKey``, SEEN/UNSEEN/KEYWORD/NEW/OLD/... become ``FlagKey`` (NEW is RECENT and UNSEEN), so an
evaluator needs one case per node. ``postier.message.matching.evaluate`` is that evaluator.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .seqset import SequenceSet

__all__ = [
    "AllKey", "AndKey", "DateKey", "FlagKey", "HeaderKey", "ModSeqKey", "NotKey", "OrKey",
    "SearchKey", "SeqSetKey", "SizeKey", "TextKey", "WithinKey",
]


@dataclass(frozen=True, slots=True)
class AllKey:
    pass


@dataclass(frozen=True, slots=True)
class SeqSetKey:
    """A sequence set (``uid=False``), UID <set>, or "$" (``sequence_set.saved``)."""

    sequence_set: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class FlagKey:
    """The message has (``present``) or lacks the flag: "\\Seen", "\\Recent", a keyword."""

    flag: str
    present: bool = True


@dataclass(frozen=True, slots=True)
class DateKey:
    """``field`` "INTERNAL" (BEFORE/ON/SINCE) or "SENT" (SENTBEFORE/...; the Date header);
    ``op`` "BEFORE", "ON" or "SINCE". Compared by calendar date only."""

    field: str
    op: str
    date: dt.date


@dataclass(frozen=True, slots=True)
class SizeKey:
    """``op`` "LARGER" or "SMALLER" than ``size`` octets (RFC822.SIZE)."""

    op: str
    size: int


@dataclass(frozen=True, slots=True)
class HeaderKey:
    """Header ``field`` (upper-cased) contains ``value`` (case-insensitive). An empty value matches
    every message that has the field (RFC 9051 §6.4.4 HEADER)."""

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class TextKey:
    """``scope`` "BODY" (the body) or "TEXT" (header and body) contains ``value``."""

    scope: str
    value: str


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """RFC 7162 §3.1.5: MODSEQ >= ``modseq``; the optional entry name/type are kept but, with no
    per-flag modseqs, evaluate like the plain form."""

    modseq: int
    entry_name: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class WithinKey:
    """RFC 5032 OLDER/YOUNGER: INTERNALDATE at least / at most ``seconds`` before the search runs
    (to the second, unlike the date-only BEFORE/SINCE)."""

    op: str  # "OLDER" or "YOUNGER"
    seconds: int


@dataclass(frozen=True, slots=True)
class NotKey:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class OrKey:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class AndKey:
    keys: tuple[SearchKey, ...]


type SearchKey = (
    AllKey | SeqSetKey | FlagKey | DateKey | SizeKey | HeaderKey | TextKey | ModSeqKey | WithinKey | NotKey
    | OrKey | AndKey
)
