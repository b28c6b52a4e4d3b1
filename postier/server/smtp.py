"""The asyncio driver of the SMTP-family listeners: smtp (MX), submission, submissions and lmtp.

A thin `asyncio.Protocol` between the socket and the sans-IO core (`proto.smtp.server`): bytes
from `data_received` go to the core, its events are answered through the role's pipeline
(`pipeline/`), and the replies of one round are written in one `transport.write`. Message data is
streamed into a `MessageBody` as it arrives (memory stays bounded for large messages) and handed
to the pipeline at the end of DATA; the final reply is written only after the pipeline reports the
message durable.

Why a Protocol rather than streams: this is the hot path of the MX. Per connection there is no
task, no StreamReader/StreamWriter and no timeout object per read; pipeline calls run as eager
tasks, so a call that finishes without waiting (a recipient lookup) costs no scheduling, and one
that waits (a delivery, DNS, a password check) pauses reading until it is answered. The idle,
command and session timeouts are one timer per session, re-armed from timestamps when it fires.

Timeouts (421 4.4.2): `limits.idle_timeout` between commands (RFC 5321 §4.5.3.2.7); a command
line, once started, within `limits.command_timeout`, and a message transfer (DATA, a BDAT chunk)
within command_timeout plus 1 s per `limits.min_data_rate` bytes received (slowloris; Postfix's
smtpd_per_record_deadline and smtpd_min_data_rate); the whole session within
`limits.session_timeout`. Time the server spends answering never counts against the client.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ..antispam.screening import ScreenResult
from ..config import IMPLICIT_TLS_ROLES
from ..faults import fault_point
from ..message.types import Envelope, MessageBody
from ..pipeline.inbound import SMTPPipeline
from ..proto import sasl
from ..proto.smtp import replies as R
from ..proto.smtp import server as core
from ..store.errors import StoreUnavailable
from .auth import settle
from .throttle import AuthThrottle
from .base import ProtocolSession

log = logging.getLogger("postier.smtp")

SUBMISSION_ROLES = frozenset({"submission", "submissions"})
R421_TOO_MANY_AUTH = R.Reply(421, "4.7.0", "Too many failed authentication attempts, try later")
R421_CONNECTION_RATE = R.Reply(421, "4.7.0", "Too many connections from your address; try again later")
R554_LISTED = R.Reply(554, "5.7.1", "Service unavailable")  # RFC 5321 §3.1, RFC 5782

#: App -> (role, implicit TLS) -> the core's settings, built once per listener.
_settings_cache: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], core.ServerSettings]] = (
    weakref.WeakKeyDictionary())
#: App -> the directory spilled message bodies go to.
_spool_cache: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()


def _server_settings(services: Any, role: str, tls_implicit: bool) -> core.ServerSettings:
    """The core's settings for one listener (built once per listener, not per connection)."""
    per_services = _settings_cache.setdefault(services, {})
    found = per_services.get((role, tls_implicit))
    if found is not None:
        return found
    cfg = services.config
    lim = cfg.limits
    submission = role in SUBMISSION_ROLES
    listener = cfg.listeners.get(role)
    ctx = services.ssl_context
    settings = core.ServerSettings(
        hostname=cfg.hostname,
        lmtp=role == "lmtp",
        max_data_line=lim.max_data_line,
        max_recipients=lim.max_recipients,
        max_message_size=lim.max_message_size,
        max_errors=lim.max_errors,
        offer_starttls=ctx is not None and role not in IMPLICIT_TLS_ROLES
        and (listener.starttls if listener else True),
        tls_active=tls_implicit,
        auth_mechanisms=("PLAIN", "LOGIN", "SCRAM-SHA-256") if submission else (),
        allow_auth_plaintext=cfg.auth.allow_plaintext,
        require_auth=submission,
    )
    per_services[(role, tls_implicit)] = settings
    return settings


class SMTPSession(ProtocolSession):
    busy_line = R.Reply(421, "4.7.0", "Too many connections, try again later").wire
    # What stopped() looks at, valid even if start() failed half-way.
    _timer: asyncio.TimerHandle | None = None
    _greet_timer: asyncio.TimerHandle | None = None
    _task: asyncio.Task[None] | None = None
    body: MessageBody | None = None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        services = self.services
        self.loop = asyncio.get_running_loop()
        self.limits = services.config.limits
        self.settings = _server_settings(services, self.role, self.tls_implicit)
        spool = _spool_cache.get(services)
        if spool is None:
            spool = _spool_cache[services] = services.config.spool_dir / "incoming"
        self.spool = spool
        self.conn = core.ServerConnection(self.settings)
        self.env = Envelope(role=self.role, peer_ip=self.peer_ip, local_ip=self.local_ip,
                            tls=self.tls_info if self.tls_implicit else None)
        self.pipeline: SMTPPipeline = services.pipelines[self.role]()
        self.body = None
        self._body_failed = False
        self.exchange: sasl.ServerExchange | None = None
        self._task = None  # a pipeline call waiting for its answer
        self._reading = True
        self._write_paused = False
        self._lost = False
        self._close_reply = R.R421_SHUTDOWN  # what a session told to close at its next step says
        self._greeted = False
        self._greet_timer = None
        # Idle, command and session timeouts: one timer, re-armed from timestamps when it fires.
        now = self.loop.time()
        self._last = now  # the last input (or the end of the server's last step)
        self._session_deadline = now + self.limits.session_timeout
        self._timer = None
        self._timer_when = 0.0
        # No later than a command deadline could fall: starting one then needs no re-arming.
        self._arm(min(now + min(self.limits.idle_timeout, self.limits.command_timeout), self._session_deadline))
        # Port 25: the DNS lists are asked at once, while the greeting waits (greet_pause); the
        # greeting is sent when both are over (antispam/screening.py).
        self._pregreet = False
        self._screening: asyncio.Future[ScreenResult] | None = None
        self._refusal: R.Reply | None = None
        if self.role == "smtp":
            rate = services.connection_rate
            if rate is not None and not rate.hit(self.peer_ip):
                self._refusal = R421_CONNECTION_RATE
                log.info("smtp: %s: more than %d connections a minute: refused", self.peer_ip, rate.limit)
            elif services.screener is not None:
                self._screening = asyncio.ensure_future(services.screener.screen(self.peer_ip))
        greet_pause = self.limits.greet_pause if self.role == "smtp" else 0.0
        if greet_pause > 0:  # postscreen's pregreet test: wait, and refuse a client that talks first
            self._greet_timer = self.loop.call_later(greet_pause, self._greet)
        else:
            self._greet()

    def stopped(self) -> None:
        self._lost = True
        if self._screening is not None and not self._screening.done():
            self._screening.cancel()
        for timer in (self._timer, self._greet_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._greet_timer = None
        if self._task is None and self.body is not None:  # else the running step owns the body
            self.body.close()
            self.body = None

    def _greet(self) -> None:
        self._greet_timer = None
        if self._greeted or self._lost:
            return
        screening = self._screening
        if screening is not None and not screening.done():  # bounded by [antispam] screen_timeout
            screening.add_done_callback(lambda _f: self._greet())
            return
        self._greeted = True
        conn = self.conn
        if self._refusal is not None:
            conn.greet(self._refusal)
        elif screening is not None:
            conn.greet(self._screened(screening), early_talker_scored=True)
        elif self.role != "smtp" and self.throttle.blocked(self.peer_ip):
            conn.greet(R421_TOO_MANY_AUTH)
        else:
            conn.greet()
        self._advance()

    def _screened(self, screening: asyncio.Future[ScreenResult]) -> R.Reply | None:
        """The greeting after DNS list screening: None (the usual 220) or a 554 naming the lists.

        RFC 5321 §3.1 lets a server refuse at the greeting with 554 and then answer 503 to all but
        QUIT, which the core does. Chosen over a 554 at the first command because the client then
        cannot make the session do any more work, and a listed sender learns why at once.
        """
        if screening.cancelled() or screening.exception() is not None:
            return None  # never block on our own failure
        res = screening.result()
        if self._pregreet:
            res = res.with_pregreet(self.services.config.antispam.pregreet_weight)
        words = res.explain()
        self.env.notes = (f"screening: {words}",)
        self.env.allowlisted = bool(res.allowlisted)
        if not res.blocked:
            if res.listed or res.pregreet or res.allowlisted:
                log.info("smtp: %s: %s", self.peer_ip, words)
            return None
        log.info("smtp: %s: %s", self.peer_ip, words)
        if self.services.decisions is not None:
            self.services.decisions.record_later("", "", self.peer_ip, "", (), "refused", (f"screening: {words}",))
        lists = ", ".join(h.zone for h in res.listed) or "local policy"
        return R554_LISTED.with_text(f"Service unavailable; client [{self.peer_ip}] blocked using {lists}"[:300])

    def shutdown(self) -> None:
        """Server stopping: a session waiting for the client gets 421 now; a busy one after its reply."""
        self.closing = True
        if self._task is None and not self._lost:
            if self._greet_timer is not None:
                self._greet_timer.cancel()
                self._greeted = True
            self.conn.shutdown(R.R421_SHUTDOWN)
            self._advance()

    def _arm(self, when: float) -> None:
        """Make the timer fire at `when` at the latest."""
        if self._timer is not None:
            if self._timer_when <= when:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _deadline(self) -> float:
        lim = self.limits
        deadline = min(self._last + lim.idle_timeout, self._session_deadline)
        cmd = self.clock.deadline()
        if cmd is not None:
            deadline = min(deadline, cmd)
        return deadline

    def _track_command(self, now: float, n: int) -> None:
        """After input: start, advance or stop the clock of a partly received command/transfer."""
        clock = self.clock
        if not self.conn.partial_input:
            clock.stop()
        elif clock.started is None:
            clock.start(now)
            self._arm(now + self.limits.command_timeout)
        else:
            clock.add(n)

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost:
            return
        now = self.loop.time()
        if now >= self._session_deadline:
            expired = True
        elif self._task is not None:  # the server is working, not waiting for the client
            expired = False
            self._last = now
            self.clock.pause(now)
        else:
            expired = now >= self._deadline()
        if not expired:
            self._arm(self._deadline())
            return
        if self.clock.started is not None and now < self._session_deadline:
            log.info("%s: %s did not finish a command in time", self.role, self.peer_ip)
        if self._task is not None:  # answer the step in progress first, then 421
            self.closing = True
            self._close_reply = R.R421_TIMEOUT
            return
        self.conn.shutdown(R.R421_TIMEOUT)  # RFC 5321 §4.5.3.2.7
        self._advance()

    # -- transport callbacks ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._last = now = self.loop.time()
        self.conn.receive_data(data)
        if not self._greeted:
            self._pregreet = True
            if self._greet_timer is not None:  # talked before the greeting
                self._greet_timer.cancel()
            self._greet()
        elif self._task is None:
            self._advance()
            if not self._lost:
                self._track_command(now, len(data))

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        if self._greeted and self._task is None:
            self._advance()
        # Keep the write side open for the replies still due (TLS transports cannot half-close).
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._set_reading()

    def _set_reading(self) -> None:
        want = self._task is None and not self._write_paused and not self._lost
        if want != self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- the event loop of the session ------------------------------------------------------------

    def _advance(self) -> None:
        """Answer the core's events until it needs input or a pipeline call has to wait."""
        conn = self.conn
        try:
            while self._task is None:
                ev = conn.next_event()
                if ev is core.NEED_DATA:
                    if self.closing:
                        conn.shutdown(self._close_reply)
                        continue
                    break
                handler = _HANDLERS.get(type(ev))
                if handler is None:
                    continue  # Quit: Close follows
                if handler(self, ev):
                    return
        except Exception:  # one session's failure never ends another session or the server
            log.exception("%s: session with %s failed", self.role, self.peer_ip)
            self._finish(abort=True)
            return
        out = conn.data_to_send()
        if out and not self._lost:
            assert self.transport is not None
            self.transport.write(out)

    def _finish(self, abort: bool = False) -> None:
        """The session is over: write what is due and close."""
        out = self.conn.data_to_send()
        t = self.transport
        if t is not None and not self._lost:
            if abort:
                t.abort()
            else:
                if out:
                    t.write(out)
                self.close_transport()

    def _call(self, coro: Coroutine[Any, Any, None]) -> bool:
        """Run one pipeline step. True when it has to wait (reading pauses until it is answered)."""
        task = asyncio.Task(coro, loop=self.loop, eager_start=True)
        if task.done():
            task.result()  # a failure propagates to _advance
            return False
        self._task = task
        self._set_reading()
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self._lost:
            self.transport.write(out)
        task.add_done_callback(self._resume)
        return True

    def _resume(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if self._lost:
            if self.body is not None:
                self.body.close()
                self.body = None
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, ConnectionError | TimeoutError | OSError):
                log.error("%s: step failed after %s left: %r", self.role, self.peer_ip, exc)
            return
        try:
            task.result()
        except (ConnectionError, TimeoutError, OSError) as exc:  # e.g. a failed TLS handshake
            log.info("%s: connection with %s failed: %s", self.role, self.peer_ip, exc)
            self._finish(abort=True)
            return
        except BaseException:
            log.exception("%s: session with %s failed", self.role, self.peer_ip)
            self._finish(abort=True)
            return
        self._last = now = self.loop.time()
        self.clock.pause(now)  # the server's time does not count against the client
        self._set_reading()
        self._advance()
        if not self._lost:
            self._track_command(now, 0)

    # -- event handlers: each returns True when the session must stop stepping --------------------

    def _on_data(self, ev: core.MessageData) -> bool:
        body = self.body
        if body is not None:
            try:
                body.write(ev.data)
            except OSError as exc:  # the spool is full or failing: read on, answer 452 at the end
                log.error("%s: spooling the message from %s failed: %s", self.role, self.peer_ip, exc)
                body.close()
                self.body = None
                self._body_failed = True
        return False

    def _on_hello(self, ev: core.Hello) -> bool:
        self.env.helo, self.env.esmtp = ev.name, ev.extended
        self.conn.accept()
        return False

    def _on_mail(self, ev: core.MailFrom) -> bool:
        return self._call(self._mail(ev))

    async def _mail(self, ev: core.MailFrom) -> None:
        reply = await self.pipeline.on_mail(self.env, ev.path, ev.params)
        self.services.metrics.smtp_reply(self.role, "mail", reply.code, reply.enhanced)  # and `postier status`
        self.conn.reply(reply)

    def _on_rcpt(self, ev: core.RcptTo) -> bool:
        return self._call(self._rcpt(ev))

    async def _rcpt(self, ev: core.RcptTo) -> None:
        reply = await self.pipeline.on_rcpt(self.env, ev.path, ev.params)
        self.services.metrics.smtp_reply(self.role, "rcpt", reply.code, reply.enhanced)  # and `postier status`
        self.conn.reply(reply)

    def _on_data_start(self, ev: core.DataStart) -> bool:
        if self.body is not None:
            self.body.close()
        self.body = MessageBody(self.spool)
        self._body_failed = False
        self.conn.accept()
        return False

    def _on_message_end(self, ev: core.MessageEnd) -> bool:
        return self._call(self._message_end(ev))

    async def _message_end(self, ev: core.MessageEnd) -> None:
        conn = self.conn
        n = len(conn.recipients)
        body, self.body = self.body, None
        try:
            if ev.problem is not None or body is None:
                fallback = R.R452_NO_SPACE if self._body_failed else R.R451_LOCAL_ERROR
                replies = [ev.problem or fallback] * n  # RFC 1870 §6.2 for a spool without space
            else:
                replies = await self.pipeline.on_message(self.env, body)
        finally:
            if body is not None:
                body.close()
        self.env.reset()
        if replies:  # a message received, or why not (metrics; `postier status`: the last hour)
            r0 = next((r for r in replies if r.is_success), replies[0])
            self.services.metrics.smtp_reply(self.role, "data", r0.code, r0.enhanced)
        fault_point("smtp.before_reply")
        if self.settings.lmtp:
            conn.reply_many(replies)
        else:
            conn.reply(replies[0])

    def _on_reset(self, ev: core.Reset) -> bool:
        self.env.reset()
        if self.body is not None:
            self.body.close()
            self.body = None
        return False

    def _on_starttls(self, ev: core.StartTLS) -> bool:
        return self._call(self._starttls())

    async def _starttls(self) -> None:
        assert self.transport is not None and self.services.ssl_context is not None
        out = self.conn.data_to_send()  # the 220 goes out in clear, before the handshake
        if out:
            self.transport.write(out)
        await self.start_tls(self.services.ssl_context)
        self._reading = True  # a fresh transport reads; _set_reading adjusts it
        self.conn.tls_started()
        self._on_reset(core.Reset())
        self.env.tls = self.tls_info
        self.env.auth_user = None

    def _on_auth(self, ev: core.AuthStart | core.AuthResponse) -> bool:
        return self._call(self._auth(ev))

    def _on_close(self, ev: core.Close | core.ConnectionClosed) -> bool:
        self._finish()
        return True

    # -- AUTH (RFC 4954) --------------------------------------------------------------------------

    @property
    def throttle(self) -> AuthThrottle:
        return self.services.throttle

    async def _auth(self, ev: core.AuthStart | core.AuthResponse) -> None:
        conn = self.conn
        if isinstance(ev, core.AuthStart):
            if self.throttle.blocked(self.peer_ip):
                conn.auth_fail(R421_TOO_MANY_AUTH)
                conn.shutdown(R421_TOO_MANY_AUTH)
                return
            self.exchange = sasl.ServerExchange.for_name(ev.mechanism, self.settings.auth_mechanisms)
            if self.exchange is None:
                conn.auth_fail(R.R504_AUTH_MECH)
                return
            outcome = self.exchange.start(ev.initial_response)
        else:
            assert self.exchange is not None
            outcome = self.exchange.respond(ev.data)
        try:
            res = await settle(self.exchange, outcome, self.services.accounts)
        except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
            log.error("%s: authentication of %s impossible: %s", self.role, self.peer_ip, exc)
            self.exchange = None
            conn.auth_fail(R.R454_AUTH_TEMP)  # RFC 4954 §6
            return
        if isinstance(res.outcome, sasl.Challenge):
            conn.auth_challenge(res.outcome.data)
            return
        mechanism, self.exchange = self.exchange.name, None
        if isinstance(res.outcome, sasl.Success) and res.user is not None:
            self.env.auth_user = res.user
            self.throttle.success(self.peer_ip)
            conn.auth_success(res.user.address)
            log.info("%s: %s authenticated as %s", self.role, self.peer_ip, res.user.address)
        else:
            await self._auth_failed(mechanism)

    async def _auth_failed(self, mechanism: str) -> None:
        self.env.auth_user = None
        self.services.metrics.auth_failed(self.role, mechanism)
        log.info("%s: authentication failed from %s", self.role, self.peer_ip)
        await self.throttle.penalize(self.peer_ip)
        if self.throttle.blocked(self.peer_ip):
            self.conn.auth_fail(R421_TOO_MANY_AUTH)
            self.conn.shutdown(R421_TOO_MANY_AUTH)
        else:
            self.conn.auth_fail(R.R535_AUTH_FAILED)


#: event type -> handler; Quit has none (the core follows it with Close).
_HANDLERS: dict[type, Callable[[SMTPSession, Any], bool]] = {
    core.MessageData: SMTPSession._on_data,
    core.Hello: SMTPSession._on_hello,
    core.MailFrom: SMTPSession._on_mail,
    core.RcptTo: SMTPSession._on_rcpt,
    core.DataStart: SMTPSession._on_data_start,
    core.MessageEnd: SMTPSession._on_message_end,
    core.Reset: SMTPSession._on_reset,
    core.StartTLS: SMTPSession._on_starttls,
    core.AuthStart: SMTPSession._on_auth,
    core.AuthResponse: SMTPSession._on_auth,
    core.Close: SMTPSession._on_close,
    core.ConnectionClosed: SMTPSession._on_close,
}
