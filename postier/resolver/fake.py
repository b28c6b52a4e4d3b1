"""A dict-backed resolver for unit tests: the same outcomes as `Resolver`, no network (STYLE.md §8).

Names are case-insensitive. A name exists when it or any name below it has data (RFC 8020: an empty
non-terminal is NODATA, not NXDOMAIN). CNAMEs are followed like a recursive resolver does, at most
8 links; a loop is a TEMPFAIL, as the SERVFAIL a real resolver returns for it.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any

from postier.resolver import (
    SUPPORTED_TYPES, Answer, BaseResolver, DNSStatus, MXRecord, RecordValue, TLSARecord, reverse_name,
)

MAX_CNAME_CHAIN = 8


def _key(name: str) -> str:
    name = name.strip().lower()
    return name if name == "." else name.rstrip(".")


def _value(rtype: str, value: Any) -> RecordValue:
    if rtype in ("A", "AAAA"):
        addr = ipaddress.ip_address(str(value))
        if (addr.version == 4) != (rtype == "A"):
            raise ValueError(f"{value!r} is not a valid {rtype} value")
        return str(addr)
    if rtype == "MX":
        if isinstance(value, MXRecord):
            return value
        if isinstance(value, tuple):
            pref, host = value
        else:
            pref, host = str(value).split()
        return MXRecord(int(pref), _key(host))
    if rtype == "TXT":
        if isinstance(value, (list, tuple)):
            return b"".join(v.encode() if isinstance(v, str) else bytes(v) for v in value)
        return value.encode() if isinstance(value, str) else bytes(value)
    if rtype in ("PTR", "CNAME"):
        return _key(str(value))
    if rtype == "TLSA":
        if isinstance(value, TLSARecord):
            return value
        usage, selector, mtype, data = str(value).split(maxsplit=3)
        return TLSARecord(int(usage), int(selector), int(mtype), bytes.fromhex(data.replace(" ", "")))
    raise ValueError(f"unsupported record type {rtype}")


class FakeResolver(BaseResolver):
    """In-memory zone: `add(name, rtype, value)`, `tempfail(name[, rtype])`; `queries` logs lookups."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], list[RecordValue]] = {}
        self._tempfail: set[tuple[str, str | None]] = set()
        self.queries: deque[tuple[str, str]] = deque(maxlen=10_000)

    def add(self, name: str, rtype: str, value: Any) -> None:
        rtype = rtype.upper()
        if rtype == "PTR":
            try:
                name = reverse_name(name)  # add("192.0.2.1", "PTR", "host.test") is allowed
            except ValueError:
                pass
        self._records.setdefault((_key(name), rtype), []).append(_value(rtype, value))

    def touch(self, name: str) -> None:
        """Make `name` exist without data (every type answers NODATA)."""
        self._records.setdefault((_key(name), "_EXISTS"), [])

    def remove(self, name: str, rtype: str | None = None) -> None:
        key = _key(name)
        for k in [k for k in self._records if k[0] == key and (rtype is None or k[1] == rtype.upper())]:
            del self._records[k]

    def tempfail(self, name: str, rtype: str | None = None) -> None:
        """Queries for `name` (of `rtype`, or any type) fail temporarily."""
        self._tempfail.add((_key(name), rtype.upper() if rtype else None))

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(k[0] == name or k[0].endswith(suffix) for k in self._records)

    def query_sync(self, name: str, rtype: str, timeout: float | None = None) -> Answer[Any]:
        rtype = rtype.upper()
        if rtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rtype}")
        key = _key(name)
        self.queries.append((key, rtype))
        if not key or any(not 0 < len(label) < 64 for label in key.split(".")) or len(key) > 253:
            return Answer(DNSStatus.NXDOMAIN, (), "invalid name")
        seen: set[str] = set()
        for _ in range(MAX_CNAME_CHAIN + 1):
            if (key, None) in self._tempfail or (key, rtype) in self._tempfail:
                return Answer(DNSStatus.TEMPFAIL, (), "timeout")
            records = self._records.get((key, rtype))
            if records:
                return Answer(DNSStatus.OK, tuple(records))
            cname = self._records.get((key, "CNAME"))
            if not cname or rtype == "CNAME":
                if self._exists(key):
                    return Answer(DNSStatus.NODATA, (), "no data")
                return Answer(DNSStatus.NXDOMAIN, (), "NXDOMAIN")
            seen.add(key)
            target = cname[0]
            assert isinstance(target, str)  # add() stores CNAME values as host text
            key = target
            if key in seen:
                break
        return Answer(DNSStatus.TEMPFAIL, (), "CNAME loop or chain too long")

    async def query(self, name: str, rtype: str) -> Answer[Any]:
        return self.query_sync(name, rtype)
