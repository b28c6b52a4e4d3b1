"""The asyncio driver of the SMTP-family listeners: smtp (MX), submission, submissions and lmtp.

A short loop between the socket and the sans-IO core (`proto.smtp.server`): read, feed, answer each
event through the role's pipeline (`pipeline/`), write. Message data is streamed into a
`MessageBody` as it arrives (memory stays bounded for large messages) and handed to the pipeline at
the end of DATA; the final reply is written only after the pipeline reports the message durable.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from ..config import IMPLICIT_TLS_ROLES
from ..pipeline.inbound import Envelope, LMTPPipeline, MXPipeline, SMTPPipeline
from ..proto import sasl
from ..proto.smtp import replies as R
from ..proto.smtp import server as core
from ..store.maildir import MessageBody
from . import throttle
from .base import Session

log = logging.getLogger("postier.smtp")

#: role -> pipeline class (or "module:Class" loaded lazily: the submission layer is optional).
PIPELINES: dict[str, Any] = {
    "smtp": MXPipeline,
    "lmtp": LMTPPipeline,
    "submission": "postier.pipeline.submission:SubmissionPipeline",
    "submissions": "postier.pipeline.submission:SubmissionPipeline",
}
SUBMISSION_ROLES = frozenset({"submission", "submissions"})
R421_TOO_MANY_AUTH = R.Reply(421, "4.7.0", "Too many failed authentication attempts, try later")
R554_NOT_AVAILABLE = R.Reply(554, "5.3.2", "This service is not available")


def _pipeline_class(role: str) -> type[SMTPPipeline] | None:
    ref = PIPELINES.get(role)
    if isinstance(ref, str):
        mod, _, attr = ref.partition(":")
        try:
            cls: type[SMTPPipeline] = getattr(importlib.import_module(mod), attr)
        except (ModuleNotFoundError, AttributeError):
            return None
        PIPELINES[role] = cls
        return cls
    return ref


class SMTPSession(Session):
    busy_line = R.Reply(421, "4.7.0", "Too many connections, try again later").wire

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.services.config
        lim = cfg.limits
        submission = self.role in SUBMISSION_ROLES
        listener = cfg.listeners.get(self.role)
        ctx = self.services.ssl_context
        self.settings = core.ServerSettings(
            hostname=cfg.hostname,
            lmtp=self.role == "lmtp",
            max_data_line=lim.max_data_line,
            max_recipients=lim.max_recipients,
            max_message_size=lim.max_message_size,
            max_errors=lim.max_errors,
            offer_starttls=ctx is not None and self.role not in IMPLICIT_TLS_ROLES
            and (listener.starttls if listener else True),
            tls_active=self.tls_implicit,
            auth_mechanisms=("PLAIN", "LOGIN", "SCRAM-SHA-256") if submission else (),
            allow_auth_plaintext=cfg.auth.allow_plaintext,
            require_auth=submission,
        )
        self.conn = core.ServerConnection(self.settings)
        self.env = Envelope(role=self.role, peer_ip=self.peer_ip, local_ip=self.local_ip,
                            tls=self.tls_info if self.tls_implicit else None)
        cls = _pipeline_class(self.role)
        self.pipeline = cls(self.services, self.role) if cls is not None else None
        self.body: MessageBody | None = None
        self.mech: sasl.ServerMechanism | None = None
        self._in_read = False
        self._task: asyncio.Task[Any] | None = None
        self._pending_success: sasl.Success | None = None
        self._final_sent = False

    # -- shutdown ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Server stopping: a session waiting for the client gets 421 now; a busy one after its reply."""
        self.closing = True
        if self._in_read and self._task is not None:
            self._task.cancel()

    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def _read(self, timeout: float) -> bytes:
        if self.closing:
            raise asyncio.CancelledError
        self._in_read = True
        try:
            return await self.read(timeout)
        finally:
            self._in_read = False

    # -- main loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        lim = self.services.config.limits
        try:
            async with asyncio.timeout(lim.session_timeout):
                await self._session(lim.idle_timeout)
        except TimeoutError:
            self.conn.shutdown(R.R421_TIMEOUT)
            await self._flush_quietly()
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.conn.shutdown(R.R421_SHUTDOWN)
            await self._flush_quietly()
        finally:
            if self.body is not None:
                self.body.close()

    async def _flush_quietly(self) -> None:
        try:
            async with asyncio.timeout(5):
                await self._flush()
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _session(self, idle: float) -> None:
        conn = self.conn
        greet_pause = self.services.config.limits.greet_pause if self.role == "smtp" else 0.0
        if greet_pause > 0:
            try:
                early = await self._read(greet_pause)
            except TimeoutError:
                early = b""
            if early:
                conn.receive_data(early)
        if self.pipeline is None:
            conn.greet(R554_NOT_AVAILABLE)
        elif self.role != "smtp" and self.throttle.blocked(self.peer_ip):
            conn.greet(R421_TOO_MANY_AUTH)
        else:
            conn.greet()
        while True:
            ev = conn.next_event()
            if ev is core.NEED_DATA:
                await self._flush()
                if self.closing:
                    conn.shutdown(R.R421_SHUTDOWN)
                    continue
                conn.receive_data(await self._read(idle))
            elif isinstance(ev, core.MessageData):
                assert self.body is not None
                self.body.write(ev.data)
            elif isinstance(ev, core.Hello):
                self.env.helo, self.env.esmtp = ev.name, ev.extended
                conn.accept()
            elif isinstance(ev, core.MailFrom):
                assert self.pipeline is not None
                conn.reply(await self.pipeline.on_mail(self.env, ev.path, ev.params))
            elif isinstance(ev, core.RcptTo):
                assert self.pipeline is not None
                conn.reply(await self.pipeline.on_rcpt(self.env, ev.path, ev.params))
            elif isinstance(ev, core.DataStart):
                self.body = MessageBody(self.services.config.spool_dir / "incoming")
                conn.accept()
            elif isinstance(ev, core.MessageEnd):
                await self._message_end(ev)
            elif isinstance(ev, core.Reset):
                self._reset()
            elif isinstance(ev, core.StartTLS):
                await self._flush()
                assert self.services.ssl_context is not None
                await self.start_tls(self.services.ssl_context)
                conn.tls_started()
                self._reset()
                self.env.tls = self.tls_info
                self.env.auth_user = None
            elif isinstance(ev, core.AuthStart | core.AuthResponse):
                await self._auth(ev)
            elif isinstance(ev, core.Quit):
                continue
            elif isinstance(ev, core.Close):
                await self._flush()
                return
            elif isinstance(ev, core.ConnectionClosed):
                return

    def _reset(self) -> None:
        self.env.reset()
        if self.body is not None:
            self.body.close()
            self.body = None

    async def _message_end(self, ev: core.MessageEnd) -> None:
        conn = self.conn
        n = len(conn.recipients)
        body, self.body = self.body, None
        try:
            if ev.problem is not None or body is None or self.pipeline is None:
                replies = [ev.problem or R.R451_LOCAL_ERROR] * n
            else:
                replies = await self.pipeline.on_message(self.env, body)
        finally:
            if body is not None:
                body.close()
        self.env.reset()
        if self.settings.lmtp:
            conn.reply_many(replies)
        else:
            conn.reply(replies[0])

    # -- AUTH (RFC 4954) --------------------------------------------------------------------------

    @property
    def throttle(self) -> throttle.AuthThrottle:
        return throttle.get(self.services)

    async def _auth(self, ev: core.AuthStart | core.AuthResponse) -> None:
        conn = self.conn
        if isinstance(ev, core.AuthStart):
            if self.throttle.blocked(self.peer_ip):
                conn.auth_fail(R421_TOO_MANY_AUTH)
                conn.shutdown(R421_TOO_MANY_AUTH)
                return
            self.mech = sasl.server_mechanism(ev.mechanism)
            if self.mech is None or ev.mechanism not in self.settings.auth_mechanisms:
                conn.auth_fail(R.R504_AUTH_MECH)
                return
            outcome = self.mech.step(ev.initial_response)
        elif self._pending_success is not None:  # the empty answer to the SCRAM server-final
            outcome = self._pending_success if not ev.data else sasl.Failure("unexpected data")
            self._pending_success = None
        else:
            assert self.mech is not None
            outcome = self.mech.step(ev.data)
        for _ in range(4):  # a mechanism asks at most a lookup and a password check per step
            if isinstance(outcome, sasl.NeedPasswordCheck):
                user = None
                if not outcome.authzid or outcome.authzid.lower() == outcome.authcid.lower():
                    user = await self.services.accounts.verify_password_async(outcome.authcid, outcome.password)
                if user is not None:
                    self.env.auth_user = user
                outcome = self.mech.password_result(user is not None)
            elif isinstance(outcome, sasl.NeedScramCredentials):
                creds = await asyncio.to_thread(self.services.accounts.scram_credentials, outcome.username)
                outcome = self.mech.scram_credentials(creds)
            else:
                break
        if isinstance(outcome, sasl.Challenge):
            conn.auth_challenge(outcome.data)
        elif isinstance(outcome, sasl.Success):
            if outcome.additional and isinstance(ev, core.AuthResponse | core.AuthStart) and not self._final_sent:
                # RFC 4954 §4: SMTP cannot carry additional data with 235: send it as a challenge.
                self._final_sent = True
                self._pending_success = outcome
                conn.auth_challenge(outcome.additional)
                return
            self._final_sent = False
            user = self.env.auth_user or await asyncio.to_thread(self.services.accounts.get_user,
                                                                 outcome.authcid)
            if user is None:
                await self._auth_failed()
                return
            self.env.auth_user = user
            self.throttle.success(self.peer_ip)
            conn.auth_success(user.address)
            log.info("%s: %s authenticated as %s", self.role, self.peer_ip, user.address)
        else:
            await self._auth_failed()

    async def _auth_failed(self) -> None:
        self.env.auth_user = None
        self._final_sent = False
        log.info("%s: authentication failed from %s", self.role, self.peer_ip)
        await self.throttle.penalize(self.peer_ip)
        if self.throttle.blocked(self.peer_ip):
            self.conn.auth_fail(R421_TOO_MANY_AUTH)
            self.conn.shutdown(R421_TOO_MANY_AUTH)
        else:
            self.conn.auth_fail(R.R535_AUTH_FAILED)
