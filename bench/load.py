"""Load bench (issue "Hardening"): how many sessions one postier process holds at once on this machine,
what each costs, and whether a long run at half the maximum ingest rate stays flat.

    python -m bench load                       # the hold phases, then a 30-minute soak
    python -m bench load --soak-minutes 3      # a short soak
    python -m bench load --no-soak --imap 2000 # only the hold phases, fewer IMAP connections

Phases (each bounded in count and time; every socket is on loopback):
1. SMTP: hold N sessions (greeted, EHLO'd) at once; a probe client meanwhile delivers a message.
2. IMAP: N authenticated connections in IDLE (LOGIN, SELECT INBOX, IDLE); memory per connection;
   then one delivery and the time until every IDLE connection of that user has seen EXISTS.
3. POP3: N users logged in at once, then every maildrop downloaded concurrently.
4. Soak: the maximum ingest rate (port 25, local delivery) measured for a few seconds, then mail at half
   that rate for --soak-minutes (half through port 25 to local users, half submitted for a remote
   domain through the queue to a local SMTP sink), maildrops emptied over POP3 every 30 s. Sampled
   every 10 s: server RSS, open descriptors (/proc/PID/fd), queue size. At the end: the queue must
   drain, RSS must not keep growing and no descriptor may leak.

The server runs with its limits raised for the bench (connections, per-user IMAP connections,
plaintext logins on loopback); clients spread over several loopback source addresses (127.0.0.x)
so that ephemeral ports do not run short, and the descriptor limit is raised with setrlimit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dnsserver import DNSServer  # noqa: E402
from tests.hardening.conftest import PASSWORD, Sink, add_cheap_user  # noqa: E402
from tests.harness import Instance  # noqa: E402

SOURCES = [f"127.0.0.{i}" for i in range(1, 17)]
MiB = 1024 * 1024


# -- measuring the server --------------------------------------------------------------------------

def rss(pid: int) -> int:
    """Resident set size of the server process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def settle(pid: int, seconds: float = 2.0) -> None:
    """Let the server finish closing sessions before a measurement (bounded)."""
    last = fds(pid)
    for _ in range(int(seconds * 10)):
        await asyncio.sleep(0.1)
        now = fds(pid)
        if now == last:
            return
        last = now


# -- a small asyncio line client -------------------------------------------------------------------

class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, addr: tuple[str, int], source: str, timeout: float = 30.0) -> Conn:
        r, w = await asyncio.wait_for(asyncio.open_connection(addr[0], addr[1], local_addr=(source, 0)), timeout)
        return cls(r, w)

    async def line(self, timeout: float = 30.0) -> bytes:
        data = await asyncio.wait_for(self.r.readline(), timeout)
        if not data:
            raise ConnectionError("closed by the server")
        return data.rstrip(b"\r\n")

    async def smtp_reply(self, timeout: float = 30.0) -> bytes:
        for _ in range(100):
            ln = await self.line(timeout)
            if len(ln) < 4 or ln[3:4] != b"-":
                return ln
        raise RuntimeError("endless SMTP reply")

    async def smtp(self, cmd: bytes, timeout: float = 30.0) -> bytes:
        self.w.write(cmd + b"\r\n")
        return await self.smtp_reply(timeout)

    async def tagged(self, tag: bytes, cmd: bytes, timeout: float = 30.0) -> bytes:
        self.w.write(tag + b" " + cmd + b"\r\n")
        for _ in range(10_000):
            ln = await self.line(timeout)
            if ln.startswith(tag + b" "):
                return ln
        raise RuntimeError("no tagged reply")

    def close(self) -> None:
        self.w.close()


async def gather_bounded(factories: list[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    """Run coroutine factories with at most `concurrency` at a time; exceptions are returned."""
    sem = asyncio.Semaphore(concurrency)

    async def one(f: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            try:
                return await f()
            except Exception as exc:
                return exc

    return await asyncio.gather(*(one(f) for f in factories))


async def send_mail(addr: tuple[str, int], source: str, sender: str, rcpt: str, body: bytes,
                    auth: tuple[str, str] | None = None) -> float:
    """One SMTP transaction on a fresh connection; returns its duration."""
    t = time.monotonic()
    c = await Conn.open(addr, source)
    try:
        assert (await c.smtp_reply()).startswith(b"220")
        assert (await c.smtp(b"EHLO load.test")).startswith(b"250")
        if auth is not None:
            token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode())
            reply = await c.smtp(b"AUTH PLAIN " + token)
            if not reply.startswith(b"235"):
                raise RuntimeError(reply)
        for cmd in (f"MAIL FROM:<{sender}>".encode(), f"RCPT TO:<{rcpt}>".encode()):
            reply = await c.smtp(cmd)
            if not reply.startswith(b"250"):
                raise RuntimeError(reply)
        assert (await c.smtp(b"DATA")).startswith(b"354")
        c.w.write(body + b".\r\n")
        reply = await c.smtp_reply(60)
        if not reply.startswith(b"250"):
            raise RuntimeError(reply)
        c.w.write(b"QUIT\r\n")
    finally:
        c.close()
    return time.monotonic() - t


def message(tag: str, sender: str = "load@remote.test", size: int = 2000) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return (f"From: {sender}\r\nTo: someone\r\nSubject: {tag}\r\nMessage-ID: <{tag}@load.test>\r\n\r\n".encode()
            + line * max(1, size // 78))


# -- phases ---------------------------------------------------------------------------------------

async def phase_smtp(inst: Instance, n: int, report: dict[str, Any]) -> None:
    pid = inst.proc.pid  # type: ignore[union-attr]
    await settle(pid)
    base_rss, base_fds = rss(pid), fds(pid)
    held: list[Conn] = []

    async def hold(i: int) -> None:
        c = await Conn.open(inst.addr("smtp"), SOURCES[i % len(SOURCES)])
        held.append(c)
        assert (await c.smtp_reply()).startswith(b"220")
        assert (await c.smtp(b"EHLO held%d.test" % i)).startswith(b"250")

    t = time.monotonic()
    res = await gather_bounded([lambda i=i: hold(i) for i in range(n)], 200)
    opened = time.monotonic() - t
    errors = [r for r in res if isinstance(r, Exception)]
    await asyncio.sleep(1)
    during = rss(pid)
    probe = await send_mail(inst.addr("smtp"), "127.0.0.99", "probe@remote.test", "load0@load.test",
                            message("smtp-probe"))
    report["smtp"] = {
        "sessions": n - len(errors), "errors": len(errors), "first_error": repr(errors[0]) if errors else None,
        "open_seconds": round(opened, 2), "server_rss_mib": round(during / MiB, 1),
        "rss_per_session_kib": round((during - base_rss) / max(1, n - len(errors)) / 1024, 1),
        "server_fds": fds(pid) - base_fds, "probe_delivery_ms": round(probe * 1000, 1),
    }
    for c in held:
        c.close()
    print("smtp:", report["smtp"], flush=True)


async def phase_imap(inst: Instance, n: int, users: list[str], report: dict[str, Any]) -> None:
    pid = inst.proc.pid  # type: ignore[union-attr]
    await settle(pid)
    base_rss, base_fds = rss(pid), fds(pid)
    held: dict[int, Conn] = {}

    async def idle(i: int) -> None:
        c = await Conn.open(inst.addr("imap"), SOURCES[i % len(SOURCES)], timeout=60)
        held[i] = c
        assert (await c.line(60)).startswith(b"* OK")
        user = users[i % len(users)]
        reply = await c.tagged(b"a", f"LOGIN {user} {PASSWORD}".encode(), 120)
        if not reply.startswith(b"a OK"):
            raise RuntimeError(reply)
        reply = await c.tagged(b"b", b"SELECT INBOX", 120)
        if not reply.startswith(b"b OK"):
            raise RuntimeError(reply)
        c.w.write(b"c IDLE\r\n")
        for _ in range(10):
            if (await c.line(120)).startswith(b"+"):
                return
        raise RuntimeError("no IDLE continuation")

    t = time.monotonic()
    res = await gather_bounded([lambda i=i: idle(i) for i in range(n)], 100)
    opened = time.monotonic() - t
    errors = [r for r in res if isinstance(r, Exception)]
    ok = n - len(errors)
    await asyncio.sleep(2)
    during = rss(pid)
    # one delivery to users[0]: how long until every one of its IDLE connections hears EXISTS?
    watchers = [held[i] for i in range(0, n, len(users)) if not isinstance(res[i], Exception)]
    t = time.monotonic()

    async def exists(c: Conn) -> float:
        for _ in range(100):
            if b"EXISTS" in await c.line(60):
                return time.monotonic() - t
        raise RuntimeError("no EXISTS")

    waits = [asyncio.ensure_future(exists(c)) for c in watchers]
    await send_mail(inst.addr("smtp"), "127.0.0.99", "wake@remote.test", users[0], message("imap-wake"))
    woke = [r for r in await asyncio.gather(*waits, return_exceptions=True) if isinstance(r, float)]
    report["imap"] = {
        "idle_connections": ok, "errors": len(errors), "first_error": repr(errors[0]) if errors else None,
        "users": len(users), "open_seconds": round(opened, 1), "logins_per_second": round(ok / opened, 1),
        "server_rss_mib": round(during / MiB, 1),
        "rss_per_connection_kib": round((during - base_rss) / max(1, ok) / 1024, 1),
        "server_fds": fds(pid) - base_fds,
        "idle_watchers_woken": f"{len(woke)}/{len(watchers)}",
        "wake_latency_ms_max": round(max(woke) * 1000, 1) if woke else None,
        "wake_latency_ms_median": round(statistics.median(woke) * 1000, 1) if woke else None,
    }
    for c in held.values():
        c.close()
    print("imap:", report["imap"], flush=True)


async def phase_pop3(inst: Instance, n: int, report: dict[str, Any]) -> None:
    pid = inst.proc.pid  # type: ignore[union-attr]
    users = [add_cheap_user(inst, f"pop{i}@load.test") for i in range(n)]
    body = message("pop3", size=20_000)
    res = await gather_bounded([lambda u=u: send_mail(inst.addr("smtp"), "127.0.0.98", "p@remote.test", u, body)
                                for u in users], 16)
    assert not [r for r in res if isinstance(r, Exception)], res
    await settle(pid)
    base_rss = rss(pid)
    conns: list[Conn | None] = [None] * n

    async def login(i: int) -> None:
        c = await Conn.open(inst.addr("pop3"), SOURCES[i % len(SOURCES)])
        conns[i] = c
        assert (await c.line()).startswith(b"+OK")
        c.w.write(f"USER {users[i]}\r\n".encode())
        assert (await c.line()).startswith(b"+OK")
        c.w.write(f"PASS {PASSWORD}\r\n".encode())
        reply = await c.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(reply)

    t = time.monotonic()
    res = await gather_bounded([lambda i=i: login(i) for i in range(n)], n)
    logged = time.monotonic() - t
    errors = [r for r in res if isinstance(r, Exception)]
    during = rss(pid)

    async def download(i: int) -> int:
        c = conns[i]
        assert c is not None
        c.w.write(b"RETR 1\r\n")
        assert (await c.line()).startswith(b"+OK")
        size = 0
        for _ in range(100_000):
            ln = await c.line()
            if ln == b".":
                break
            size += len(ln) + 2
        c.w.write(b"QUIT\r\n")
        await c.line()
        return size

    t = time.monotonic()
    sizes = await gather_bounded([lambda i=i: download(i) for i in range(n) if conns[i] is not None], n)
    took = time.monotonic() - t
    got = [s for s in sizes if isinstance(s, int)]
    report["pop3"] = {
        "concurrent_sessions": n - len(errors), "errors": len(errors),
        "first_error": repr(errors[0]) if errors else None, "login_seconds": round(logged, 2),
        "rss_per_session_kib": round((during - base_rss) / max(1, n - len(errors)) / 1024, 1),
        "downloads": len(got), "download_seconds": round(took, 2),
        "download_mib_per_s": round(sum(got) / MiB / max(took, 1e-6), 1),
    }
    for c in conns:
        if c is not None:
            c.close()
    print("pop3:", report["pop3"], flush=True)


def queue_size(inst: Instance) -> int:
    out = inst.cli("queue", "list").stdout
    for line in out.splitlines():
        if line.startswith("-- ") and "message" in line:
            return int(line.split()[1])
    return -1


async def drain_maildrops(inst: Instance, users: list[str]) -> int:
    """Delete every message of `users` over POP3 (keeps the soak's storage flat). Returns how many."""
    total = 0
    for i, u in enumerate(users):
        c = await Conn.open(inst.addr("pop3"), SOURCES[i % len(SOURCES)])
        try:
            await c.line()
            c.w.write(f"USER {u}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
            await c.line()
            if not (await c.line()).startswith(b"+OK"):
                continue  # in use by the previous round: next time
            count = int((await c.line()).split()[1])
            c.w.write(b"".join(b"DELE %d\r\n" % k for k in range(1, count + 1)) + b"QUIT\r\n")
            for _ in range(count + 1):
                await c.line(60)
            total += count
        finally:
            c.close()
    return total


class Mix:
    """The soak's traffic: even k to a local user through port 25, odd k submitted for a remote
    domain (queue, then the sink). Remembers which remote messages were acknowledged."""

    def __init__(self, inst: Instance, users: list[str], sender: str) -> None:
        self.inst, self.users, self.sender = inst, users, sender
        self.acked_remote: set[str] = set()
        self.errors: list[str] = []

    async def send(self, k: int, prefix: str) -> None:
        try:
            if k % 2:
                tag = f"{prefix}-r-{k}"
                await send_mail(self.inst.addr("submission"), SOURCES[k % len(SOURCES)], self.sender,
                                f"r{k % 50}@remote.test", message(tag, self.sender), auth=(self.sender, PASSWORD))
                self.acked_remote.add(tag)
            else:
                await send_mail(self.inst.addr("smtp"), SOURCES[k % len(SOURCES)], "soak@remote.test",
                                self.users[k % len(self.users)], message(f"{prefix}-l-{k}"))
        except Exception as exc:
            if len(self.errors) < 20:
                self.errors.append(repr(exc))
            raise


def sink_tags(sink: Sink, seen: Counter[str]) -> None:
    """Move what the sink received into a counter of Subject tags (bounded memory)."""
    n = len(sink.messages)
    for m in sink.messages[:n]:
        found = re.search(rb"Subject: (\S+)", m)
        seen[found.group(1).decode() if found else "?"] += 1
    del sink.messages[:n]


async def measure_rate(mix: Mix, seconds: float, concurrency: int) -> float:
    """Messages per second the server accepts with `concurrency` clients sending the soak's mix."""
    stop = time.monotonic() + seconds
    done = 0
    counter = iter(range(10_000_000))

    async def worker() -> None:
        nonlocal done
        for _ in range(1_000_000):
            if time.monotonic() >= stop:
                return
            try:
                await mix.send(next(counter), "rate")
            except Exception:
                continue
            done += 1

    t = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - t)


async def phase_soak(inst: Instance, sink: Sink, minutes: float, rate: float | None, users: list[str],
                     sender: str, report: dict[str, Any]) -> None:
    pid = inst.proc.pid  # type: ignore[union-attr]
    mix = Mix(inst, users, sender)
    seen: Counter[str] = Counter()
    if rate is None:
        max_rate = await measure_rate(mix, 20, 16)
        await drain_maildrops(inst, users)
        rate = max_rate / 2
    else:
        max_rate = rate * 2
    print(f"soak: {minutes} min at {rate:.1f} msg/s (half of {max_rate:.1f})", flush=True)
    await settle(pid)
    samples: list[dict[str, float]] = []
    sent = errors = late = 0
    start = time.monotonic()
    end = start + minutes * 60
    interval = 1.0 / rate
    inflight: set[asyncio.Task[Any]] = set()
    next_sample = start
    next_drain = start + 30
    base_fds = fds(pid)
    drainer: asyncio.Task[int] | None = None

    def done(t: asyncio.Task[Any]) -> None:
        nonlocal sent, errors
        inflight.discard(t)
        if t.cancelled() or t.exception() is not None:
            errors += 1
        else:
            sent += 1

    for k in range(int(minutes * 60 * rate) + 10):  # bounded by count and by time
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_sample:
            sink_tags(sink, seen)
            samples.append({"t": round(now - start, 1), "rss_mib": round(rss(pid) / MiB, 2), "fds": fds(pid),
                            "sent": sent, "errors": errors, "late": late,
                            "remote_delivered": sum(v for t, v in seen.items() if t.startswith("soak-r-"))})
            print("soak sample:", samples[-1], flush=True)
            next_sample += 10
        if now >= next_drain and (drainer is None or drainer.done()):
            drainer = asyncio.ensure_future(drain_maildrops(inst, users))
            next_drain += 30
        if len(inflight) < 64:
            task = asyncio.ensure_future(mix.send(k, "soak"))
            inflight.add(task)
            task.add_done_callback(done)
        else:
            late += 1  # the server (or this client) fell behind: counted, never queued without bound
        await asyncio.sleep(max(0.0, start + (k + 1) * interval - time.monotonic()))
    elapsed = time.monotonic() - start
    if inflight:
        await asyncio.wait(inflight, timeout=120)
    if drainer is not None:
        await asyncio.wait([drainer], timeout=120)
    # the queue must drain
    t = time.monotonic()
    q = queue_size(inst)
    for _ in range(120):
        if q == 0:
            break
        await asyncio.sleep(1)
        q = queue_size(inst)
    drain_s = time.monotonic() - t
    await drain_maildrops(inst, users)
    await asyncio.sleep(1)
    sink_tags(sink, seen)
    await settle(pid, 5)
    final_rss, final_fds = rss(pid), fds(pid)
    acked = mix.acked_remote
    lost = [tag for tag in acked if seen[tag] == 0]
    dups = {tag: n for tag, n in seen.items() if n > 1}
    warm = [s["rss_mib"] for s in samples if s["t"] >= min(60, minutes * 60 / 3)]
    first = warm[0] if warm else samples[0]["rss_mib"]
    growth = (final_rss / MiB - first) / first * 100 if first else 0.0
    report["soak"] = {
        "minutes": minutes, "max_ingest_msg_per_s": round(max_rate, 1), "rate_msg_per_s": round(rate, 1),
        "achieved_msg_per_s": round(sent / elapsed, 1), "sent": sent, "errors": errors, "late": late,
        "first_errors": mix.errors[:3], "remote_acknowledged": len(acked),
        "remote_at_sink": sum(seen[t] for t in acked), "remote_lost": len(lost), "remote_duplicates": len(dups),
        "duplicate_examples": dict(list(dups.items())[:5]),
        "queue_at_end": q, "queue_drain_seconds": round(drain_s, 1),
        "rss_mib_after_warmup": first, "rss_mib_end": round(final_rss / MiB, 2),
        "rss_growth_percent": round(growth, 1), "fds_start": base_fds, "fds_end": final_fds,
        "samples": samples,
    }
    verdict = {
        "queue_empty": q == 0,
        "nothing_lost": not lost,
        "no_duplicates": not dups,
        "memory_flat": growth < 15.0,
        "no_fd_leak": final_fds <= base_fds + 5,
    }
    report["soak"]["verdict"] = verdict
    print("soak:", {k: v for k, v in report["soak"].items() if k != "samples"}, flush=True)


# -- main -------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "fd_limit": raise_fd_limit()}}
    with DNSServer() as dns, tempfile.TemporaryDirectory(prefix="postier-load-") as tmp:
        sink = Sink()
        dns.add("remote.test", "A", "127.0.0.1")  # implicit MX: the sink
        total = args.smtp + args.imap + args.pop3 + 500
        inst = Instance(Path(tmp) / "srv", "load.test", extra_config=(
            f"[limits]\nmax_connections = {total}\nmax_connections_per_ip = {total}\n"
            "idle_timeout = 3600.0\nsession_timeout = 7200.0\n"
            "[auth]\nallow_plaintext = true\nfailure_delay = 0.0\n"
            f"[imap]\nmax_connections_per_user = {args.imap}\n"
            "[submission]\nmax_messages_per_day = 100000000\n"
            "[queue]\nretry_initial = 2.0\nretry_max = 10.0\n"
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n'
            "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"))
        users = [add_cheap_user(inst, f"load{i}@load.test") for i in range(args.users)]
        sender = add_cheap_user(inst, "sender@load.test")
        inst.start()
        try:
            assert inst.proc is not None
            report["server_rss_mib_at_start"] = round(rss(inst.proc.pid) / MiB, 1)
            if args.smtp:
                await phase_smtp(inst, args.smtp, report)
            if args.imap:
                await phase_imap(inst, args.imap, users, report)
            if args.pop3:
                await phase_pop3(inst, args.pop3, report)
            if args.soak_minutes > 0:
                await phase_soak(inst, sink, args.soak_minutes, args.rate, users, sender, report)
        finally:
            inst.stop()
            sink.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smtp", type=int, default=1000, help="SMTP sessions held at once (0: skip)")
    ap.add_argument("--imap", type=int, default=10_000, help="IMAP connections in IDLE at once (0: skip)")
    ap.add_argument("--pop3", type=int, default=200, help="concurrent POP3 sessions (0: skip)")
    ap.add_argument("--users", type=int, default=100, help="IMAP/soak users the connections are spread over")
    ap.add_argument("--soak-minutes", type=float, default=30.0)
    ap.add_argument("--no-soak", action="store_true")
    ap.add_argument("--rate", type=float, default=None,
                    help="soak rate in messages/s (default: half of the maximum measured first)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    if args.no_soak:
        args.soak_minutes = 0
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        report = asyncio.run(run(args))
    else:
        report = uvloop.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    verdict = report.get("soak", {}).get("verdict", {})
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
