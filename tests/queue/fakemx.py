"""A scripted fake MX for queue tests: asyncio, in the test's event loop, on loopback addresses.

One port shared by several loopback addresses (127.0.0.x), so that DNS can point MX hosts at
different addresses while the queue dials one configured port. Replies are scripted per stage;
`final` replies are consumed one per transaction (the last one repeats), and "DROP" closes the
connection instead of answering the final dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_CAPS = ["PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]


@dataclass
class Delivery:
    ip: str
    connection: int
    mail: str  # the MAIL line as received
    rcpts: list[str]  # RCPT lines (accepted ones)
    data: bytes  # unstuffed content


@dataclass
class FakeMX:
    ips: list[str]
    caps: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))
    greeting: str = "220 fake.test ESMTP"
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_reply: Callable[[str], str] = lambda line: "250 2.1.5 Ok"
    final: list[str] = field(default_factory=lambda: ["250 2.0.0 Ok: queued"])
    auth: tuple[str, str] | None = None  # (user, password) accepted by AUTH PLAIN
    port: int = 0
    delivered: list[Delivery] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # final replies that were not 2xx
    connections: int = 0
    pipelined_groups: int = 0
    commands: list[str] = field(default_factory=list)

    async def start(self) -> int:
        """Bind every address on one free port (bind port 0 on the first, then that port on the rest)."""
        for _ in range(50):
            socks: list[socket.socket] = []
            try:
                port = 0
                for ip in self.ips:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    socks.append(s)
                    s.bind((ip, port))
                    port = s.getsockname()[1]
                    s.listen(100)
                    s.setblocking(False)
            except OSError:
                for s in socks:
                    s.close()
                continue
            self.port = port
            self.servers = [await asyncio.start_server(self._session, sock=s) for s in socks]
            return port
        raise RuntimeError("no common free port")

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)

    def _next_final(self) -> str:
        return self.final.pop(0) if len(self.final) > 1 else self.final[0]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_id = self.connections
        ip = writer.get_extra_info("sockname")[0]
        buf = b""

        async def line() -> bytes | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    return None
                buf += chunk
            ln, _, buf = buf.partition(b"\r\n")
            return ln

        def send(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        try:
            send(self.greeting)
            if not self.greeting.startswith("220"):
                await writer.drain()
                return
            mail = ""
            rcpts: list[str] = []
            while True:
                await writer.drain()
                raw = await asyncio.wait_for(line(), 10)
                if raw is None:
                    return
                if b"\r\n" in buf:
                    self.pipelined_groups += 1
                cmd = raw.decode("utf-8", "replace")
                self.commands.append(cmd)
                verb = cmd[:4].upper()
                if verb == "EHLO":
                    lines = ["fake.test", *self.caps]
                    for i, c in enumerate(lines):
                        send(f"250{'-' if i < len(lines) - 1 else ' '}{c}")
                elif verb == "HELO":
                    send("250 fake.test")
                elif verb == "AUTH":
                    import base64
                    parts = cmd.split()
                    ok = False
                    if self.auth and len(parts) == 3 and parts[1].upper() == "PLAIN":
                        _, u, p = base64.b64decode(parts[2]).split(b"\0")
                        ok = (u.decode(), p.decode()) == self.auth
                    send("235 2.7.0 Ok" if ok else "535 5.7.8 Bad")
                elif verb == "MAIL":
                    mail, rcpts = cmd, []
                    send(self.mail_reply)
                elif verb == "RCPT":
                    r = self.rcpt_reply(cmd)
                    if r.startswith("2"):
                        rcpts.append(cmd)
                    send(r)
                elif verb == "DATA":
                    if not rcpts or not mail or not self.mail_reply.startswith("2"):
                        send("554 5.5.1 No valid recipients")
                        continue
                    send("354 go ahead")
                    await writer.drain()
                    data = bytearray()  # not bytes +=: quadratic for a message of many MiB
                    while True:
                        ln = await asyncio.wait_for(line(), 10)
                        if ln is None:
                            return
                        if ln == b".":
                            break
                        data += (ln[1:] if ln.startswith(b".") else ln) + b"\r\n"
                    reply = self._next_final()
                    if reply == "DROP":
                        writer.close()
                        return
                    if reply.startswith("2"):
                        self.delivered.append(Delivery(ip, conn_id, mail, rcpts, bytes(data)))
                    else:
                        self.refused.append(reply)
                    send(reply)
                    mail, rcpts = "", []
                elif verb == "RSET":
                    mail, rcpts = "", []
                    send("250 2.0.0 Ok")
                elif verb == "NOOP":
                    send("250 2.0.0 Ok")
                elif verb == "QUIT":
                    send("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    send("502 5.5.1 Unknown")
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
