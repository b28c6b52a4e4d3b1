"""Runs each local user's active Sieve script at delivery (RFC 5228 §2.10) and carries out its plan:
stores, redirects and vacation replies through the queue, SMTP-time refusals (RFC 5429 §2.2).

The MX and LMTP pipelines hand their local recipients here after the inbound checks. A user's own
active script runs; without one, their domain's default script (`[sieve.domain_scripts]`), else the
server's (`[sieve] default_script`). A default is replaced by the user's script, never run before it
(Pigeonhole's `sieve_default`, not `sieve_before`): what a user writes is all that runs for them
(the verdict's Junk folder still is their implicit keep's). Users with no script at all are
delivered as before, all at once. For a user with a script, it runs in a worker thread (CPU-bounded by `sieve.Limits`); `sieve.outcome.plan`
turns its result into stores, outgoing messages and a refusal. The verdict's Junk folder is the
default mailbox of the implicit keep, so an explicit `fileinto` wins over it. Any failure of the
script or the plan falls back to the implicit keep (RFC 5228 §2.10.6: mail is never lost). Stores
and redirects are durable before the caller answers; a vacation reply that cannot be queued is
logged, not fatal.

The message is never read whole (`sieve.Message.at` over the prefix and the spooled body: its header
section only, the body read by a body test within bounds); a copy stored unchanged is the received
prefix and body themselves, delivered as without a script; an edited or redirected copy is written
into a new spooled `MessageBody` a piece at a time (`_spooled`). The ARC seal of a redirect is the one
exception: dkimpy hashes the body from bytes.

Which script a user has is remembered per process (`SieveFilter._known`, an `accounts.FreshCache`
as the recipient resolution's): a delivery within `accounts.CACHE_CHECK` seconds of the last read of the user's
scripts takes the answer (often "none") on the event loop, with no thread hop and no disk access, and
a script whose text did not change is not compiled again. A change made by another process (another
worker's ManageSieve, `postier sieve`) therefore applies within CACHE_CHECK (0.1 s); one made in this
process (ManageSieve, the web settings: both go through `store_for`) applies to the next delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..accounts import CACHE_CHECK, FreshCache
from ..config import Config, ConfigError
from ..mailauth.arc import ARCSealer
from ..mailauth.srs import SRS
from ..message.types import HEADER_LIMIT, Enqueuer, Envelope, LocalOutcome, MessageBody, Recipient, Signer, User
from ..proto.smtp.replies import Reply
from ..sieve import CompileError, Environment, Limits, Message, Script, compile_script, run
from ..sieve.interpreter import Copy, chained
from ..sieve.outcome import Delivery, Plan, plan
from ..store.delivery import LocalDelivery
from ..store.index import encode_suffix, names_to_flags
from ..store.maildir import DeliveryError, folder_root
from ..store.api import MailStoreAPI
from ..store.errors import StoreError
from ..store.sieve import FileSieveStorage, Scripts, SieveStorage, Tracking

__all__ = ["SieveFilter", "SieveOutcome"]

log = logging.getLogger("postier.sieve")


@dataclass(frozen=True, slots=True)
class SieveOutcome:
    """Local delivery with scripts: what was delivered, and recipients refused by a script."""

    local: LocalOutcome
    refused: dict[str, Reply]  # recipient address -> 550 5.7.1 (RFC 5429 §2.2)


def _load(key: str, path: Path) -> Script:
    """A default script, compiled at start: one that cannot be read or compiled is a configuration error."""
    try:
        return compile_script(path.read_bytes(), "default")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except CompileError as exc:
        raise ConfigError(f"{key}: {path}: {'; '.join(str(e) for e in exc.errors)}") from None


_MAX_CACHED = 1000  # users whose script (or its absence) is remembered; emptied when full


@dataclass(frozen=True, slots=True)
class _Known:
    """What `SieveFilter._script` found for one user: the script to run (None: plain delivery)."""

    source: tuple[str, bytes] | None  # the active script's name and text, None for a default or none
    script: Script | None


class _Watched:
    """One user's scripts as ManageSieve and the web settings use them: every change, once made (or
    failed part way), also forgets what the filter remembered (`FreshCache.changed`).

    Reads (and `max_script_size`) reach the inner store through `__getattr__`, so they need no
    method here. The writes are the methods of `Scripts` that change a script or which one is active;
    each is named below because each must forget, and a write added to `Scripts` must be added here
    too (tests/sieve/test_script_cache.py fails on a method of `Scripts` it does not know)."""

    def __init__(self, inner: Scripts, changed: Callable[[], None]) -> None:
        self._inner = inner
        self._changed = changed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._changed()

    def put(self, name: str, data: bytes, check: Callable[[bytes], None] | None = None) -> None:
        with self._changing():
            self._inner.put(name, data, check)

    def delete(self, name: str) -> None:
        with self._changing():
            self._inner.delete(name)

    def rename(self, old: str, new: str) -> None:
        with self._changing():
            self._inner.rename(old, new)

    def set_active(self, name: str) -> None:
        with self._changing():
            self._inner.set_active(name)


class SieveFilter:
    """Delivery through Sieve for the MX and LMTP pipelines (one per server, shared by sessions)."""

    def __init__(self, config: Config, mda: LocalDelivery, queue: Enqueuer, signer: Signer | None,
                 srs: SRS | None = None, mailstore: MailStoreAPI | None = None, arc: ARCSealer | None = None,
                 storage: SieveStorage | None = None) -> None:
        self.config = config
        self.arc = arc  # seals redirected mail (RFC 8617)
        self.mailstore = mailstore  # registers the keywords a script gives a stored message
        self.srs = srs
        self.mda = mda
        self.queue = queue
        self.signer = signer
        s = config.sieve
        #: scripts and tracking: each user's home, or PostgreSQL in cluster mode
        self.storage = storage or FileSieveStorage(config.mail_root, s.max_scripts, s.max_script_size)
        self.limits = Limits(max_redirects=s.max_redirects)
        # Vacation and duplicate decisions are read-then-write on the user's tracking store: one user's
        # deliveries plan one at a time (striped locks: bounded, whatever the number of users).
        self._locks = tuple(threading.Lock() for _ in range(64))
        self._default = _load("sieve.default_script", s.default_script) if s.default_script else None
        self._domain_default = {domain.lower().rstrip("."): _load(f"sieve.domain_scripts.{domain}", path)
                                for domain, path in s.domain_scripts.items()}

        # address -> the user's script, as last read (module docstring); changed through `store_for`
        self._known: FreshCache[str, _Known] = FreshCache(_MAX_CACHED)

    def store_for(self, user: User) -> Scripts:
        """The user's scripts for ManageSieve and the web settings (changes apply to the next delivery)."""
        return _Watched(self.storage.scripts(user), self._known.changed)

    def _script(self, user: User) -> Script | None:
        """The user's active script (compiled), else their domain's default, else the server's (blocking)."""
        until, generation = time.monotonic() + CACHE_CHECK, self._known.generation
        active = self.storage.scripts(user).active_script()
        before = self._known.last(user.address)
        if active is None:
            script = self._domain_default.get(user.domain.lower(), self._default)
        elif before is not None and before.source == active:  # unchanged: compiled already
            script = before.script
        else:
            try:
                script = compile_script(active[1], active[0])
            except CompileError as e:  # checked at upload; a script changed on disk behind our back
                log.warning("%s: active script %r does not compile: %s", user.address, active[0], e)
                script = None
        self._known.put(user.address, _Known(active, script), until, generation)
        return script

    async def deliver(self, env: Envelope, recipients: Sequence[Recipient], prefix: bytes, body: MessageBody,
                      folder: str | None, lmtp: bool) -> SieveOutcome:
        """Deliver to every local user the recipients reach, each once, through their scripts."""
        owners: dict[str, tuple[User, Recipient]] = {}
        for r in recipients:
            for u in r.users:
                owners.setdefault(u.address, (u, r))
        scripts: dict[str, Script | None] = {}
        unavailable: set[str] = set()  # whose script could not be read: nothing delivered, 4xx (retried)
        for a, (u, _r) in owners.items():
            known = self._known.get(u.address)
            if known is not None:  # read less than CACHE_CHECK seconds ago: no thread hop
                scripts[a] = known.script
                continue
            try:
                scripts[a] = await asyncio.to_thread(self._script, u)
            except (StoreError, OSError) as exc:  # e.g. cluster mode's PostgreSQL unreachable
                log.error("%s: cannot read the Sieve script of %s: %s", env.qid, u.address, exc)
                scripts[a] = None
                unavailable.add(a)
        plain = [dataclasses.replace(r, users=tuple(u for u in r.users if scripts[u.address] is None
                                                    and u.address not in unavailable))
                 for r in recipients]
        outcome = await self.mda.deliver_recipients(plain, prefix, body, env.mail_from, folder)
        failed = set(outcome.failed_users) | unavailable
        refused: dict[str, Reply] = {}
        filtered = [(u, r, s) for a, (u, r) in owners.items() if (s := scripts[a]) is not None]
        # RFC 5429 §2.2: refused in protocol when the reply concerns this recipient alone
        single = lmtp or (len(recipients) == 1 and len(owners) == 1 and not recipients[0].remote)
        for user, rcpt, script in filtered:
            try:
                ok, refuse = await self._one(env, user, rcpt, script, prefix, body, folder, single)
            except Exception:
                log.exception("%s: sieve delivery to %s failed; implicit keep", env.qid, user.address)
                kept = await self.mda.deliver([(user, folder)], prefix, body, env.mail_from)
                ok, refuse = kept[0].ok, None
            if not ok:
                failed.add(user.address)
            if refuse is not None:
                refused[rcpt.address] = Reply(550, "5.7.1", refuse[:200] or "Rejected by the recipient's filter")
        delivered = frozenset(r.address for r in recipients if not any(u.address in failed for u in r.users))
        return SieveOutcome(LocalOutcome(delivered, tuple(sorted(failed)), outcome.over_quota), refused)

    async def _one(self, env: Envelope, user: User, rcpt: Recipient, script: Script, prefix: bytes,
                   body: MessageBody, folder: str | None, single: bool) -> tuple[bool, str | None]:
        """One user's script: (every store durable, the refusal reason or None)."""
        default = folder or "INBOX"
        p = await asyncio.to_thread(self._plan, env, user, rcpt, script, prefix, body, default, single)
        if p.refuse is not None and single:
            return True, p.refuse
        # RFC 5228 §4.1: a missing mailbox is created (as :create, RFC 5490 §3.2, would)
        targets = [(user, None if st.mailbox.upper() == "INBOX" else st.mailbox) for st in p.stores]
        ok = True
        for (u, folder_name), st in zip(targets, p.stores, strict=True):
            async with self._copied(st.message, prefix, body) as (head, data):
                info = await self._flags(u, folder_name, st.flags)
                res = await self.mda.deliver([(u, folder_name)], head, data, env.mail_from, info)
                if not res[0].ok and folder_name is not None:  # an unusable folder name: keep in INBOX
                    info = await self._flags(u, None, st.flags)
                    res = await self.mda.deliver([(u, None)], head, data, env.mail_from, info)
            ok = ok and res[0].ok
        for send in p.sends:
            try:
                frm = send.mail_from
                if send.kind == "redirect" and self.srs is not None and frm:  # SPF passes at the target
                    frm = self.srs.forward(frm, user.domain)
                arc = b""
                if send.kind == "redirect" and self.arc is not None:  # RFC 8617 §4: we forward, we seal
                    # dkimpy hashes the body from bytes: the one place a redirect reads the copy whole
                    whole = await asyncio.to_thread(bytes, send.message)
                    arc = await self.arc.seal(whole, user.domain)
                    del whole
                await self._send(env, send.kind, frm, send.rcpt_to, send.message, arc)
            except Exception:
                log.exception("%s: sieve %s to %s could not be queued", env.qid, send.kind, send.rcpt_to)
                if send.kind == "redirect":
                    ok = False  # the copy would be lost: the client retries (4xx)
        return ok, None

    @contextlib.asynccontextmanager
    async def _copied(self, copy: Copy, prefix: bytes, body: MessageBody) -> AsyncIterator[tuple[bytes, MessageBody]]:
        """What to deliver for a copy the plan stores: the message as received is `prefix` and `body`
        themselves (delivered from where they are, as without a script); an edited one is written,
        its header then the original's body a piece at a time, into a new spooled body."""
        if copy.original:
            yield prefix, body
            return
        spooled = await asyncio.to_thread(self._spooled, copy)
        try:
            yield b"", spooled
        finally:
            spooled.close()

    def _spooled(self, copy: Copy) -> MessageBody:
        """`copy` in a new MessageBody (spilled to the spool directory once large; blocking)."""
        out = MessageBody(self.config.spool_dir)
        try:
            for piece in copy.pieces():
                out.write(piece)
        except BaseException:
            out.close()
            raise
        return out

    async def _flags(self, user: User, folder: str | None, flags: Sequence[str]) -> str:
        """RFC 5232 §5: the Maildir info suffix (":2,FSa") giving the stored message its flags; the
        keywords are registered with the folder through the mail store (letters are per folder). ""
        when there are none, for an mbox, or when the folder name is unusable (the caller keeps)."""
        if not flags or user.mailbox_format != "maildir":
            return ""
        try:
            folder_root(user.maildir(self.config.mail_root), folder)
        except (DeliveryError, ValueError):
            return ""
        store = self.mailstore
        if store is None:  # system flags only: keywords need the folder's letters
            bits, _ = names_to_flags([f for f in flags if f.startswith("\\")])
            return encode_suffix("", bits, (), ()) if bits else ""

        def suffix() -> str:
            mb = store.acquire(user)
            try:
                return mb.delivery_suffix(folder or "INBOX", flags)
            finally:
                store.release(mb)

        try:
            return await store.call(suffix)
        except Exception:
            log.exception("%s: cannot register the flags %s; stored without them", user.address, " ".join(flags))
            return ""

    def _exists(self, user: User, box: str) -> bool:
        """RFC 5490 §3.1 mailboxexists (blocking): the Maildir folder, else the mail store's (cluster mode)."""
        try:
            if folder_root(user.maildir(self.config.mail_root), box).is_dir():
                return True
        except Exception:
            return False
        store = self.mailstore
        if store is None:
            return False
        try:
            mb = store.acquire(user)
            try:
                return mb.exists(box)
            finally:
                store.release(mb)
        except Exception:
            return False

    def _plan(self, env: Envelope, user: User, rcpt: Recipient, script: Script, prefix: bytes, body: MessageBody,
              default: str, single: bool) -> Plan:
        """Run the script and plan its result (blocking: a worker thread). The script sees the
        message (`prefix` then `body`) through its header alone; only a body test reads the body
        (`sieve.Message`), and the plan refers to it without reading it (`sieve.Copy`)."""
        message = Message.at(chained(prefix, body.read_at), len(prefix) + body.size, len(prefix) + HEADER_LIMIT)
        with self._locks[zlib.crc32(user.address.lower().encode()) % len(self._locks)]:
            tracking = self.storage.tracking(user)
            try:
                with tracking.exclusive():  # and against the other worker processes and nodes
                    return self._plan_locked(env, user, rcpt, script, message, default, single, tracking)
            finally:
                tracking.close()

    def _plan_locked(self, env: Envelope, user: User, rcpt: Recipient, script: Script, message: Message,
                     default: str, single: bool, tracking: Tracking) -> Plan:
        now = time.time()
        senv = Environment(
            envelope_from=env.mail_from, envelope_to=rcpt.address, orig_to=rcpt.address,
            now=dt.datetime.now(dt.UTC), subaddress_delimiter=self.config.mailbox.recipient_delimiter or "+",
            default_mailbox=default,
            mailbox_exists=lambda name: name.upper() == "INBOX" or self._exists(user, name),
            duplicate_seen=lambda key: tracking.seen("dup\0" + key, time.time()),
            spamtest=lambda _m, percent: ("100" if percent else "10") if default == "Junk" else (
                "0" if percent else "1"),
            limits=self.limits,
        )
        result = run(script, message, senv)
        if result.error is not None:
            log.info("%s: sieve runtime error for %s: %s (implicit keep)", env.qid, user.address, result.error)
        d = Delivery(sender=env.mail_from, recipient=rcpt.address, user_email=user.address,
                     own_addresses=(user.address, rcpt.address), in_smtp=single, hostname=self.config.hostname)
        p = plan(result, message, d, tracking, default_mailbox=default, now=now)
        for key, seconds in p.duplicate_marks:  # RFC 7352 §3.3
            tracking.record("dup\0" + key, now + max(1, seconds))
        return p

    async def _send(self, env: Envelope, kind: str, mail_from: str, rcpt_to: str, message: Copy | bytes,
                    arc: bytes = b"") -> None:
        """Queue one outgoing message; vacation replies and notices are DKIM-signed (RFC 5230 §4.3),
        a redirect (a `Copy`, written into the spool a piece at a time) carries the ARC set `arc`."""
        out = Envelope(role="sieve", peer_ip="127.0.0.1", mail_from=mail_from,
                       recipients=[Recipient(rcpt_to)])
        if isinstance(message, Copy):
            body = await asyncio.to_thread(self._spooled, message)
        else:
            body = MessageBody(self.config.spool_dir)
            body.write(message)
        try:
            prefix = arc
            if kind != "redirect" and self.signer is not None:
                prefix = await self.signer.sign(out, body)
            await self.queue.enqueue(out, [rcpt_to], prefix, body)
        finally:
            body.close()
