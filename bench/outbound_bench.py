"""Outbound benchmark: postier's queue vs Postfix's, delivering the same load to smtp-sink, in one run;
and submission-to-remote-Maildir latency between two postier instances.

1. Throughput. N messages of SIZE bytes, each to one recipient of `sink.test` (no MX: its A record,
   127.0.0.1, RFC 5321 §5.1), delivered at concurrency 20 to Postfix's smtp-sink on a loopback
   high port. Both queues are filled first and then released, so only delivery is measured:
   - postier: the running server's spool is filled from outside (files fsynced, then all rows in
     one commit), and its runner drains the queue when its next scan finds them;
   - Postfix (a throwaway instance, its own config/queue/data directories, relayhost = the sink,
     destination concurrency 20 from the start): smtp-source injects into its smtpd with every
     message put on hold, then `postsuper -H ALL` and `postqueue -f` release them.
   The rate is N / (time of the N-th message at the sink - time of the 1st), from smtp-sink's own
   running counters (-c), read as they are printed; both systems are timed the same way.
2. Latency. postier a.test (127.0.0.2) and b.test (127.0.0.3), an in-process DNS server with their
   MX records: alice submits on 587 (STARTTLS, AUTH, one connection), one message at a time; the
   time until the file appears in bob's Maildir on b is measured (p50/p95/max), and so is the time
   of the submission's 250.

Usage: python -m bench outbound [--messages 2000] [--size 1024] [--concurrency 20] [--samples 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from postier.queue.spool import MessageInfo, RecipientSpec, Spool
from tests import postfix
from tests.dnsserver import DNSServer
from tests.harness import Instance, free_port

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"


class Sink:
    """smtp-sink with running counters (-c); records when each count of messages was reached."""

    def __init__(self) -> None:
        self.port = free_port()
        args = [SMTP_SINK, "-c", f"127.0.0.1:{self.port}", "1024"]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.count = 0
        self.first: float | None = None
        self.times: dict[int, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.2)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\r")
            for line in lines:
                for field in line.split():
                    if field.startswith(b"mesg="):
                        n = int(field[5:])
                        with self._lock:
                            if n > self.count:
                                if self.first is None:
                                    self.first = now
                                self.count = n
                                self.times[n] = now

    def wait(self, n: int, timeout: float) -> float:
        """Seconds from the first message to the n-th; raises on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.count >= n and self.first is not None:
                    return self.times[min(k for k in self.times if k >= n)] - self.first
            time.sleep(0.01)
        raise RuntimeError(f"smtp-sink got {self.count} of {n} messages")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def body(i: int, size: int) -> bytes:
    head = (f"From: <bench@a.test>\r\nTo: <u{i}@sink.test>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench{i}@a.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    text = line * max(0, (size - len(head)) // len(line))
    return head + text


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_postier(n: int, size: int, concurrency: int, work: Path) -> dict[str, float]:
    sink = Sink()
    with DNSServer() as dns:
        dns.add("sink.test", "A", "127.0.0.1")
        inst = Instance(work / "postier-out", "a.test", extra_config=(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n'
            f"[queue]\nconcurrency_per_domain = {concurrency}\n"))
        try:
            inst.start()
            assert inst.proc is not None
            time.sleep(1.0)  # let start-up finish before the CPU baseline
            cpu0 = cpu_seconds(inst.proc.pid)
            # Fill the running server's queue: spool files first (fsynced), then every row in one
            # transaction, so the runner's next scan (within its poll interval) sees the whole batch.
            spool = Spool(inst.root / "spool" / "queue")
            now = time.time()
            t0 = time.monotonic()
            ops = []
            for i in range(n):
                msg_id = f"{i:08X}BE7C4000"
                size_written = spool.write_file(msg_id, b"", body(i, size))
                info = MessageInfo(msg_id, "bench@a.test", now, size_written)
                ops.append(Spool.op_insert(info, [RecipientSpec(f"u{i}@sink.test")], now))
            spool.run(ops)
            spool.close()
            fill = time.monotonic() - t0
            elapsed = sink.wait(n, timeout=max(120.0, n / 20))
            cpu = cpu_seconds(inst.proc.pid) - cpu0
        finally:
            inst.stop()
            sink.stop()
    return {"rate": n / elapsed if elapsed > 0 else float("inf"), "elapsed": elapsed, "fill": fill, "cpu": cpu}


def postfix_hold_count(pf: postfix.Postfix) -> int:
    d = pf.root / "spool" / "hold"
    return sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def run_postfix(n: int, size: int, concurrency: int) -> dict[str, float]:
    sink = Sink()
    pf = postfix.Postfix("127.0.0.1", free_port(), {
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "default_destination_concurrency_limit": str(concurrency),
        "smtp_destination_concurrency_limit": str(concurrency),
        "relay_destination_concurrency_limit": str(concurrency),
        "initial_destination_concurrency": str(concurrency),
        "smtpd_client_restrictions": "check_client_access static:HOLD",
        "smtp_tls_security_level": "none",
    })
    pf.start()
    try:
        t0 = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-s", "20", "-m", str(n), "-l", str(size), "-f", "bench@a.test",
                        "-t", "u@sink.test", f"127.0.0.1:{pf.port}"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while postfix_hold_count(pf) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        fill = time.monotonic() - t0
        held = postfix_hold_count(pf)
        if held < n:
            raise RuntimeError(f"postfix held {held} of {n} messages: {pf.log()[-2000:]}")
        subprocess.run([POSTSUPER, "-c", str(pf.etc), "-H", "ALL"], check=True, capture_output=True)
        subprocess.run([POSTQUEUE, "-c", str(pf.etc), "-f"], check=True, capture_output=True)
        elapsed = sink.wait(n, timeout=max(120.0, n / 20))
    finally:
        pf.stop()
        sink.stop()
    return {"rate": n / elapsed if elapsed > 0 else float("inf"), "elapsed": elapsed, "fill": fill}


def run_latency(samples: int, work: Path) -> dict[str, float]:
    with DNSServer() as dns:
        a = Instance(work / "lat-a", "a.test", address="127.0.0.2")
        b = Instance(work / "lat-b", "b.test", address="127.0.0.3")
        for inst, ip in ((a, "127.0.0.2"), (b, "127.0.0.3")):
            dns.add(inst.domain, "MX", f"10 {inst.hostname}")
            dns.add(inst.hostname, "A", ip)
        a.add_config(f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {b.port("smtp")}\n')
        b.add_config(f'[dns]\nnameservers = ["{dns.nameserver}"]\n')
        a.add_user("alice@a.test", "password123")
        b.add_user("bob@b.test", "password123")
        a.start()
        b.start()
        new = b.maildir("bob@b.test") / "new"
        total: list[float] = []
        accept: list[float] = []
        try:
            with smtplib.SMTP(*a.addr("submission"), timeout=30) as s:
                s.starttls(context=a.client_ssl_context())
                s.login("alice@a.test", "password123")
                for i in range(samples + 2):
                    before = len(os.listdir(new)) if new.is_dir() else 0
                    msg = (f"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: latency {i}\r\n\r\nhello\r\n").encode()
                    t0 = time.monotonic()
                    s.sendmail("alice@a.test", ["bob@b.test"], msg)
                    t1 = time.monotonic()
                    deadline = t1 + 30
                    while not (new.is_dir() and len(os.listdir(new)) > before):
                        if time.monotonic() > deadline:
                            raise RuntimeError("message never arrived at b.test")
                        time.sleep(0.0005)
                    t2 = time.monotonic()
                    if i >= 2:  # the first two warm up (TLS sessions, caches)
                        accept.append(t1 - t0)
                        total.append(t2 - t0)
        finally:
            a.stop()
            b.stop()
    total.sort()
    return {"p50": statistics.median(total), "p95": total[int(0.95 * (len(total) - 1))], "max": total[-1],
            "accept_p50": statistics.median(accept)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench outbound", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--skip-postfix", action="store_true")
    args = ap.parse_args(argv)
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.path.exists(tool):
            print(f"missing {tool} (Debian's postfix package)", file=sys.stderr)
            return 2
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="postier-bench-out-"))
    try:
        print(f"outbound: {args.messages} messages of {args.size} bytes, concurrency {args.concurrency}, "
              f"queue -> smtp-sink on loopback", flush=True)
        p = run_postier(args.messages, args.size, args.concurrency, work)
        print(f"  postier  {p['rate']:8.0f} msg/s  ({p['elapsed']:.2f} s; {p['cpu'] / args.messages * 1e3:.2f} ms "
              f"CPU/msg; queue filled in {p['fill']:.1f} s)", flush=True)
        f = None
        if not args.skip_postfix and postfix.available():
            f = run_postfix(args.messages, args.size, args.concurrency)
            print(f"  postfix  {f['rate']:8.0f} msg/s  ({f['elapsed']:.2f} s; queue filled in {f['fill']:.1f} s)",
                  flush=True)
        lat = run_latency(args.samples, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| measure | postier | Postfix | postier / Postfix |")
    print("|---|---|---|---|")
    if f:
        print(f"| queue -> smtp-sink, msg/s (c={args.concurrency}) | {p['rate']:.0f} | {f['rate']:.0f} | "
              f"{p['rate'] / f['rate']:.2f} |")
    else:
        print(f"| queue -> smtp-sink, msg/s (c={args.concurrency}) | {p['rate']:.0f} | - | - |")
    print(f"| submission -> remote Maildir, p50 | {lat['p50'] * 1e3:.1f} ms | - | - |")
    print(f"| submission -> remote Maildir, p95 / max | {lat['p95'] * 1e3:.1f} / {lat['max'] * 1e3:.1f} ms | - | - |")
    print(f"| submission 250 (durable in queue), p50 | {lat['accept_p50'] * 1e3:.1f} ms | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
