"""Inbound SMTP benchmark: postier vs Postfix on this machine, in the same run.

Measures, with Postfix's smtp-source as the client for both servers:
- durable ingest rate (messages/s acknowledged with 250; postier answers only after the Maildir file
  and new/ are fsynced), at 1 KiB and 64 KiB, 20 concurrent sessions, a new connection per message
  and reused connections. Postfix is measured two ways: its 250 (queue file fsynced) and the time
  until its virtual(8) agent has written every message into a Maildir;
- memory per idle SMTP session: sessions that each got their EHLO reply, on a fresh server before
  any load; the growth of RSS and of USS (private pages) from N/2 to N sessions, per session
  (Postfix's smtpd processes share most of their pages, so USS is the fairer figure for it);
- peak memory with 20 concurrent 25 MiB messages.

The CPU time (user + system, from /proc) per message of each server is printed too (for Postfix,
every process of the instance, exited ones included): unlike a rate, it hardly moves when something
else runs on the machine.

With `--workers N` (N > 1) a second postier instance runs with `[server] workers = N` and the ingest
rates of both are shown side by side (docs/scaling.md).

Usage: python -m bench smtp [--messages 2000] [--idle 500] [--rounds 1] [--skip-big] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench import postfix_checks
from bench.postfix_checks import PostfixChecks
from tests import postfix
from tests.antispam.rspamd_server import RspamdServer
from tests.harness import Instance, free_port

DNSBL = "bl.bench.test"  # the bench's DNS blocklist: lists nobody (every query NXDOMAIN, cached by its SOA)
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def uss_kb(pids: list[int]) -> int:
    """Unique set size: the pages only these processes map (PSS would move with whatever other
    process on the machine happens to share libpython or libc pages at that moment)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process and its threads (plus its reaped children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # it exited meanwhile
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postier_cpu(pid: int) -> float:
    """CPU time of the server and of its delivery agent process."""
    return sum(cpu_seconds(p) for p in children(pid))


def postfix_cpu(pf: postfix.Postfix) -> float:
    """CPU time of every Postfix process, the exited ones included (master reaps them all)."""
    pids = postfix_pids(pf)
    return sum(cpu_seconds(p, children=(i == 0)) for i, p in enumerate(pids))


def children(pid: int) -> list[int]:
    out = [pid]
    try:
        for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += children(int(p))
    except OSError:
        pass
    return out


def postfix_pids(pf: postfix.Postfix) -> list[int]:
    try:
        master = int((pf.root / "spool" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError):
        return []
    return children(master)


def count_files(d: Path) -> int:
    n = 0
    for root, _dirs, files in os.walk(d):
        if root.endswith(("/new", "/cur")):
            n += len(files)
    return n


def smtp_source(port: int, to: str, n: int, size: int, sessions: int, reuse: bool) -> tuple[float, float]:
    """Run smtp-source; return (its start time on the perf_counter clock, its duration)."""
    args = [SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size), "-f", "bench@remote.test",
            "-t", to, "-M", "client.bench.test"]
    if reuse:
        args.append("-d")
    t0 = time.perf_counter()
    # Its own session, hence its own scheduler autogroup: otherwise the client would share one with
    # postier (a child of this process) but not with Postfix (whose master daemonizes), and postier
    # would get half the CPU share Postfix gets whenever something else keeps the machine busy.
    subprocess.run(args + [f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=3600,
                   start_new_session=True)
    return t0, time.perf_counter() - t0


def _read_reply(s: socket.socket, deadline: float) -> bytes:
    """Read one complete (possibly multi-line) SMTP reply."""
    buf = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        last = buf.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if buf.endswith(b"\r\n") and last[3:4] == b" ":
            return buf
    raise RuntimeError(f"no complete reply: {buf[:200]!r}")


def idle_sessions(port: int, n: int) -> list[socket.socket]:
    """n sessions that have each been greeted and have received their EHLO reply."""
    socks = []
    deadline = time.monotonic() + 120
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
        assert _read_reply(s, deadline).startswith(b"220")
        s.sendall(b"EHLO idle.test\r\n")
    for s in socks:
        assert _read_reply(s, deadline).startswith(b"250")
    time.sleep(1.0)  # let the servers settle (allocator, late page faults)
    return socks


def idle_memory(port: int, n: int, pids_fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(RSS, USS) growth in KiB per idle session, as the slope between n/2 and n sessions (the first
    sessions of a fresh process may fit in memory its allocator already holds)."""
    half = n // 2
    first = idle_sessions(port, half)
    try:
        pids = pids_fn()
        rss0, uss0 = rss_kb(pids), uss_kb(pids)
        second = idle_sessions(port, n - half)
        try:
            pids = pids_fn()
            return (rss_kb(pids) - rss0) / (n - half), (uss_kb(pids) - uss0) / (n - half)
        finally:
            for s in second:
                s.close()
    finally:
        for s in first:
            s.close()


def peak_rss_during(fn, pids_fn) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(pids_fn()))
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    try:
        elapsed = fn()
    finally:
        done.set()
        th.join()
    return elapsed, peak


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench smtp", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--idle", type=int, default=500, help="idle sessions for the memory measure")
    ap.add_argument("--rounds", type=int, default=1, help="runs per configuration; the median is shown")
    ap.add_argument("--skip-big", action="store_true", help="skip the 20 x 25 MiB peak-memory run")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--mailauth", action="store_true",
                    help="SPF, DKIM and DMARC checks on both sides, against an in-process DNS server in which the "
                         "sender domain has no SPF or DMARC record: postier's own checks; Postfix with "
                         "policyd-spf, OpenDKIM and OpenDMARC (bench/postfix_checks.py)")
    ap.add_argument("--antispam", action="store_true",
                    help="spam defence on both sides: postier's DNSBL screening and Rspamd; Postfix with postscreen "
                         "and Rspamd's milter (the same Rspamd, started by the bench)")
    ap.add_argument("--no-dns-cache", action="store_true", help="with --mailauth: every lookup goes to DNS")
    ap.add_argument("--workers", type=int, default=1,
                    help="also measure postier with [server] workers = N (0: one per core), side by side")
    args = ap.parse_args(argv)
    use_pf = postfix.available() and not args.no_postfix and os.path.exists(SMTP_SOURCE)
    work = Path(tempfile.mkdtemp(prefix="postier-bench-"))
    work.chmod(0o755)
    extra = f"[limits]\nmax_connections_per_ip = {args.idle + 100}\nmax_connections = {args.idle + 200}\n"
    dns_server = None
    checks: PostfixChecks | None = None
    rspamd = None
    if (args.mailauth or args.antispam) and use_pf:
        if postfix_checks.missing():
            raise SystemExit("the Postfix side needs: apt-get install " + " ".join(postfix_checks.missing())
                             + " (or --no-postfix)")
        checks = PostfixChecks(work / "checks", mailauth=args.mailauth, dnsbl=DNSBL if args.antispam else None,
                               rspamd_milter=free_port() if args.antispam else None)
    if args.mailauth or args.antispam:
        from tests.dnsserver import DNSServer
        # On port 53 when Postfix's checks must find it through resolv.conf (postfix_checks.py).
        dns_server = (DNSServer(postfix_checks.DNS_HOST, 53) if checks else DNSServer()).start()
        dns_server.negative_ttl = 300  # as real zones do: NXDOMAIN answers carry an SOA and are cached
        dns_server.add("remote.test", "MX", "10 mx.remote.test.", ttl=300)  # no SPF, no DMARC: NXDOMAIN
        dns_server.add("mx.remote.test", "A", "127.0.0.1", ttl=300)
        extra += (f'\n[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
                  + ("cache = false\n" if args.no_dns_cache else ""))
        if args.mailauth:
            extra += "\n[mailauth]\nspf = true\ndkim_verify = true\ndmarc = true\n"
    if args.antispam:
        assert dns_server is not None
        rspamd = RspamdServer(work / "rspamd", dns_server.nameserver,
                              milter_port=checks.rspamd_milter if checks else None)
        print("starting Rspamd (its first start compiles its regular expressions: up to a few minutes)")
        rspamd.start()
        extra += (f'\n[antispam]\nrspamd = "{rspamd.url}"\n'
                  f'dnsbl = [{{ zone = "{DNSBL}", weight = 3 }}]\nthreshold = 3\n')
    inst = Instance(work / "postier", "b.test", extra_config=extra)
    inst.add_user("u@b.test")
    inst.start()
    assert inst.proc is not None
    pid = inst.proc.pid
    multi = None  # the same server with N worker processes
    if args.workers != 1:
        multi = Instance(work / "postier-n", "b.test", extra_config=extra, workers=args.workers)
        multi.add_user("u@b.test")
        multi.start()
    pf = None
    vmail = work / "vmail"
    if use_pf:
        vmail.mkdir()
        shutil.chown(vmail, "postfix", "postfix")
        pf = postfix.Postfix("127.0.0.1", free_port(), {
            "virtual_mailbox_domains": "b.test",
            "virtual_mailbox_base": str(vmail),
            "virtual_mailbox_maps": "inline:{ u@b.test=b.test/u/ }",
            "virtual_uid_maps": "static:" + str(_uid("postfix")),
            "virtual_gid_maps": "static:" + str(_gid("postfix")),
            "virtual_mailbox_limit": "0",
            "message_size_limit": str(60 * 1024 * 1024),
            "default_process_limit": str(args.idle + 100),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "virtual_destination_concurrency_limit": "20",
            **(checks.main_cf() if checks else {}),
        }, master_extra=checks.master_cf() if checks else "", prefix=checks.prefix() if checks else None,
            postscreen=args.antispam)
        if checks is not None:
            checks.start()
        pf.start()
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        # Memory per idle session first, on fresh processes (no load has grown their heaps yet).
        ours_rss, ours_uss = idle_memory(inst.port("smtp"), args.idle, lambda: children(pid))
        pf_idle = "-"
        if pf is not None:
            pf_rss, pf_uss = idle_memory(pf.port, args.idle, lambda: postfix_pids(pf))
            pf_idle = f"{pf_rss:.1f} KiB (USS {pf_uss:.1f})"
        md_root = inst.root / "mail"
        if args.antispam or args.mailauth:
            # Both servers cache what they learn about a client (postscreen its verdict and greeting
            # wait, postier its DNS answers): one warm-up batch each, so no round pays for a cold cache.
            smtp_source(inst.port("smtp"), "u@b.test", args.sessions, 1024, args.sessions, False)
            if pf is not None:
                smtp_source(pf.port, "u@b.test", args.sessions, 1024, args.sessions, False)
                deadline = time.monotonic() + 120
                while _count(vmail / "b.test" / "u" / "new") < args.sessions and time.monotonic() < deadline:
                    time.sleep(0.05)
        for size in (1024, 65536):
            for reuse in (False, True):
                label = f"{size // 1024} KiB, {'reused' if reuse else 'new'} connections"
                n = args.messages if size == 1024 else max(200, args.messages // 2)
                ours_rates, cpu_ms, pf_rates, pf_md_rates, pf_cpu_ms = [], [], [], [], []
                rs_ms, pf_rs_ms = [], []  # Rspamd's CPU per message, for each side's messages
                multi_rates: list[float] = []
                multi_cpu_ms: list[float] = []
                for _ in range(args.rounds):
                    if multi is not None and multi.proc is not None:
                        m_root = multi.root / "mail"
                        _aside(m_root)
                        mcpu0 = postier_cpu(multi.proc.pid)
                        _t0, t = smtp_source(multi.port("smtp"), "u@b.test", n, size, args.sessions, reuse)
                        multi_cpu_ms.append((postier_cpu(multi.proc.pid) - mcpu0) * 1000 / n)
                        got = count_files(m_root)
                        if got != n:
                            raise RuntimeError(f"postier (workers): {got} of {n} messages in the Maildir")
                        multi_rates.append(n / t)
                    # Benchmark trap on ext4: move old Maildirs aside instead of deleting them.
                    _aside(md_root)
                    cpu0, r0, s0 = postier_cpu(pid), rspamd_cpu(rspamd), rspamd_scanned(rspamd)
                    _t0, t = smtp_source(inst.port("smtp"), "u@b.test", n, size, args.sessions, reuse)
                    cpu_ms.append((postier_cpu(pid) - cpu0) * 1000 / n)
                    rs_ms.append((rspamd_cpu(rspamd) - r0) * 1000 / n)
                    _assert_scanned("postier", s0, rspamd, n)
                    got = count_files(md_root)
                    if got != n:
                        raise RuntimeError(f"postier: {got} of {n} messages in the Maildir")
                    ours_rates.append(n / t)
                    if pf is not None:
                        _aside(vmail, keep_owner=True)
                        new = vmail / "b.test" / "u" / "new"
                        pcpu0, ccpu0, r0 = postfix_cpu(pf), checks_cpu(checks), rspamd_cpu(rspamd)
                        s0 = rspamd_scanned(rspamd)
                        t0, tp = smtp_source(pf.port, "u@b.test", n, size, args.sessions, reuse)
                        deadline = time.monotonic() + 600
                        while _count(new) < n and time.monotonic() < deadline:
                            time.sleep(0.01)
                        t_md = time.perf_counter() - t0
                        pf_cpu_ms.append((postfix_cpu(pf) - pcpu0 + checks_cpu(checks) - ccpu0) * 1000 / n)
                        pf_rs_ms.append((rspamd_cpu(rspamd) - r0) * 1000 / n)
                        _assert_scanned("Postfix", s0, rspamd, n)
                        if checks is not None:
                            _assert_checked(new, args.mailauth, args.antispam)
                        pf_rates.append(n / tp)
                        pf_md_rates.append(n / t_md)
                ours = statistics.median(ours_rates)
                many = statistics.median(multi_rates) if multi_rates else 0.0
                theirs, ratio = "-", "-"
                rs = f" + Rspamd {statistics.median(rs_ms):.2f}" if rspamd else ""
                if pf_rates:
                    pf_rs = f" + Rspamd {statistics.median(pf_rs_ms):.2f}" if rspamd else ""
                    theirs = (f"{statistics.median(pf_rates):.0f} / {statistics.median(pf_md_rates):.0f}"
                              f" ({statistics.median(pf_cpu_ms):.2f} ms{pf_rs})")
                    ratio = f"{ours / statistics.median(pf_rates):.2f}x"
                    if multi_rates:
                        ratio += f" / {many / statistics.median(pf_rates):.2f}x"
                rows.append((label, f"{ours:.0f} ({statistics.median(cpu_ms):.2f} ms CPU/msg{rs})",
                             f"{many:.0f} ({statistics.median(multi_cpu_ms):.2f} ms)" if multi_rates else "-",
                             theirs, ratio))
        rows.append((f"memory per idle session ({args.idle} sessions)",
                     f"{ours_rss:.1f} KiB (USS {ours_uss:.1f})", "-", pf_idle, "-"))
        if not args.skip_big:
            big = 25 * 1024 * 1024
            _aside(md_root)
            # Peak RSS of all the server's processes, and its growth over the RSS just before (Postfix
            # still has the smtpd processes of the idle-session measure then, about 10 MiB each).
            base = rss_kb(children(pid))
            t, peak = peak_rss_during(lambda: smtp_source(inst.port("smtp"), "u@b.test", 20, big, 20, False)[1],
                                      lambda: children(pid))
            pf_peak = "-"
            if pf is not None:
                pf_base = rss_kb(postfix_pids(pf))
                tp, pk = peak_rss_during(lambda: smtp_source(pf.port, "u@b.test", 20, big, 20, False)[1],
                                         lambda: postfix_pids(pf))
                pf_peak = f"{pk / 1024:.0f} MiB (+{(pk - pf_base) / 1024:.0f}; {tp:.1f}s)"
            rows.append(("peak RSS, 20 concurrent 25 MiB messages",
                         f"{peak / 1024:.0f} MiB (+{(peak - base) / 1024:.0f}; {t:.1f}s)", "-", pf_peak, "-"))
    finally:
        inst.stop()
        if multi is not None:
            multi.stop()
        if dns_server is not None:
            dns_server.stop()
        if rspamd is not None:
            rspamd.stop()
        if pf is not None:
            pf.stop()
        if checks is not None:
            checks.stop()
        shutil.rmtree(work, ignore_errors=True)
    parts = []
    if args.mailauth:
        parts.append("SPF+DKIM+DMARC" + ("; Postfix with policyd-spf, OpenDKIM and OpenDMARC" if checks else ""))
    if args.antispam:
        parts.append("DNSBL screening + Rspamd" + ("; Postfix with postscreen and Rspamd's milter" if checks else ""))
    if args.no_dns_cache:
        parts.append("postier without its DNS cache")
    what = "; ".join(parts) or "no checks"
    print(f"\nSMTP ingest ({what}): {args.sessions} concurrent sessions, smtp-source as client, "
          f"{os.cpu_count()} cores, median of {args.rounds} round(s)")
    workers = f"postier {multi.workers} workers" if multi is not None else "postier N workers"
    print(f"{'measure':<45} {'postier msg/s (CPU/msg)':<30} {workers:<22} {'Postfix 250 / Maildir msg/s (CPU)':<36} "
          "ratio (postier 1 / N workers vs Postfix 250)")
    for r in rows:
        print(f"{r[0]:<45} {r[1]:<30} {r[2]:<22} {r[3]:<36} {r[4]}")
    return 0


def checks_cpu(checks: PostfixChecks | None) -> float:
    """CPU seconds of the milters (policyd-spf is a child of Postfix's master, counted with it)."""
    if checks is None:
        return 0.0
    return sum(cpu_seconds(q) for p in checks.pids() for q in children(p))


def rspamd_cpu(rspamd: RspamdServer | None) -> float:
    return 0.0 if rspamd is None else sum(cpu_seconds(p) for p in children(rspamd.pid()))


def rspamd_scanned(rspamd: RspamdServer | None) -> int:
    """Rspamd's count of scanned messages (its controller's /stat)."""
    if rspamd is None:
        return 0
    import json
    import urllib.request

    req = urllib.request.Request(rspamd.controller + "/stat", headers={"Password": rspamd.password})
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(json.load(r).get("scanned", 0))


def _assert_scanned(who: str, before: int, rspamd: RspamdServer | None, n: int) -> None:
    if rspamd is not None and rspamd_scanned(rspamd) - before < n:
        raise RuntimeError(f"{who}: Rspamd scanned {rspamd_scanned(rspamd) - before} of {n} messages")


def _assert_checked(new: Path, mailauth: bool, antispam: bool) -> None:
    """Every check must have run on Postfix's side too, or the comparison means nothing."""
    name = next(iter(sorted(os.listdir(new))))
    head = (new / name).read_bytes().split(b"\n\n", 1)[0]
    marks = (b"Received-SPF:", b"dmarc=", b"dkim=") if mailauth else ()  # policyd-spf, OpenDMARC, OpenDKIM
    for mark in marks:
        if mark not in head:
            raise RuntimeError(f"Postfix's checks did not run ({mark.decode()} missing):\n{head.decode()}")


def _count(d: Path) -> int:
    try:
        return len(os.listdir(d))
    except FileNotFoundError:
        return 0


def _aside(root: Path, keep_owner: bool = False) -> None:
    """Move a Maildir tree aside (ext4 pays for creating files right after deleting many)."""
    if not root.exists():
        return
    dest = root.parent / f"{root.name}.old.{time.monotonic_ns()}"
    root.rename(dest)
    root.mkdir()
    if keep_owner:
        shutil.chown(root, "postfix", "postfix")


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid
