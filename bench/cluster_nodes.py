"""The bounded load run of cluster mode (`python -m bench cluster --nodes 3`, see bench/cluster_bench.py):
three postier nodes on 127.0.0.2-4 sharing one PostgreSQL and one S3 bucket (moto's or SeaweedFS's
server in its own process: bench/objectstore.py, `--s3`),
SMTP in round-robin from several clients, IMAP reads on other nodes, rates, latency and CPU per message.
"""

from __future__ import annotations

import imaplib
import os
import resource
import shutil
import smtplib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from bench.objectstore import MotoProcess as MotoProcess  # noqa: F401 - its old home, for other benchmarks
from bench.objectstore import ObjectStore, start_store
from bench.outbound_bench import Sink
from bench.smtp_ingest import children, cpu_seconds
from tests.cluster.conftest import PgServer
from tests.dnsserver import DNSServer
from tests.hardening.conftest import PASSWORD, add_cheap_user
from tests.harness import Instance

DOMAIN = "cluster.test"
SINK_DOMAIN = "sink.test"


def _pg_cpu(pg: PgServer) -> float:
    """CPU of the postmaster, its live backends and its reaped children."""
    try:
        master = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    kids = children(master)
    return cpu_seconds(master, children=True) + sum(cpu_seconds(p) for p in kids[1:])


def _nodes_cpu(nodes: list[Instance]) -> float:
    return sum(cpu_seconds(p, children=True) for n in nodes if n.proc is not None for p in children(n.proc.pid))


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _message(i: int, rcpt: str, size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"  # 80 bytes
    body = (line * (size // len(line) + 1))[:size]
    return (f"From: load@example.net\r\nTo: {rcpt}\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}@example.net>\r\n\r\n").encode() + body + b"\r\n"


def _quit(conns: Iterable[smtplib.SMTP]) -> None:
    """End the client sessions of a sender thread (one that broke is simply left)."""
    for c in conns:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            pass


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def loopback_free(count: int, what: str) -> bool:
    """Whether 127.0.0.2 up to 127.0.0.(count + 1), one per node, can be bound here; says which
    cannot on stderr (`what` names the benchmark)."""
    for i in range(count):
        a = f"127.0.0.{i + 2}"
        try:
            with socket.socket() as s:
                s.bind((a, 0))
        except OSError:
            print(f"cannot bind {a}: {what} needs 127.0.0.2-{count + 1}", file=sys.stderr)
            return False
    return True


def run_nodes(count: int, messages: int, clients: int, users: int, size: int, time_limit: float,
              relay: int = 0, s3_kind: str = "moto") -> int:
    addrs = [f"127.0.0.{i + 2}" for i in range(count)]
    if not loopback_free(count, "the node mode"):
        return 2
    pg, s3 = PgServer(), start_store(s3_kind)
    nodes: list[Instance] = []
    sink: Sink | None = None
    dns: DNSServer | None = None
    outbound = ""
    if relay:
        # The remote domain: its A record is 127.0.0.1 (no MX, RFC 5321 §5.1), where smtp-sink listens.
        sink, dns = Sink(), DNSServer().start()
        dns.negative_ttl = 300  # cached as real answers are (the MX and AAAA queries get NXDOMAIN/NODATA)
        dns.add(SINK_DOMAIN, "A", "127.0.0.1", ttl=300)
        outbound = f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n'
    tmp = Path(tempfile.mkdtemp(prefix="postier-cluster-bench-"))
    try:
        pg.start()
        dsn = pg.create_db()
        for i, a in enumerate(addrs):
            d = tmp / f"node{i}"
            d.mkdir()
            (d / "s3.secret").write_text("test\n")
            inst = Instance(d, DOMAIN, address=a, extra_config=(
                f'[cluster]\ndsn = "{dsn}"\ns3_endpoint = "{s3.endpoint}"\ns3_bucket = "bench"\n'
                f's3_access_key = "test"\ns3_secret_key_file = "s3.secret"\ntimeout = 10.0\n'
                "[limits]\nmax_connections = 1000\nmax_connections_per_ip = 1000\n"
                "[auth]\nfailure_delay = 0.0\n" + outbound))
            nodes.append(inst)
        names = [f"u{k}@{DOMAIN}" for k in range(users)]
        for n in names:  # made on node 0's single-machine store, then copied into PostgreSQL
            add_cheap_user(nodes[0], n)
        nodes[0].cli("cluster", "init")
        nodes[0].cli("cluster", "import-accounts")
        for inst in nodes:
            inst.start()
        print(f"{count} nodes on {', '.join(addrs)}; PostgreSQL 15 (fsync off) and {s3.name} S3 in their own "
              f"processes; {messages} messages of {size} B to {users} users from {clients} clients", flush=True)

        # -- SMTP: message i goes to node i % count, user (i // count) % users ---------------------------
        latencies: list[float] = []
        errors: list[str] = []
        next_i = iter(range(messages))
        lock = threading.Lock()
        deadline = time.monotonic() + time_limit
        sent_to: dict[str, list[int]] = {n: [] for n in names}

        def sender() -> None:
            conns: dict[int, smtplib.SMTP] = {}
            try:
                while time.monotonic() < deadline:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    node, rcpt = i % count, names[(i // count) % users]
                    data = _message(i, rcpt, size)
                    t = time.perf_counter()
                    try:
                        c = conns.get(node)
                        if c is None:
                            c = conns[node] = smtplib.SMTP(*nodes[node].addr("smtp"), timeout=60)
                        c.sendmail("load@example.net", [rcpt], data)
                    except (smtplib.SMTPException, OSError) as exc:
                        conns.pop(node, None)
                        with lock:
                            errors.append(f"message {i} via node {node}: {exc}")
                        continue
                    dt = time.perf_counter() - t
                    with lock:
                        latencies.append(dt)
                        sent_to[rcpt].append(i)
            finally:
                _quit(conns.values())

        cpu0 = (_nodes_cpu(nodes), _pg_cpu(pg), cpu_seconds(s3.proc.pid), _self_cpu())
        t0 = time.perf_counter()
        threads = [threading.Thread(target=sender) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        smtp_time = time.perf_counter() - t0
        cpu1 = (_nodes_cpu(nodes), _pg_cpu(pg), cpu_seconds(s3.proc.pid), _self_cpu())
        ok = len(latencies)

        # -- IMAP: user k is read on node k % count; what it got came in through every node ------------
        read = 0
        read_bytes = 0
        problems: list[str] = []
        queue = list(range(users))

        def reader() -> None:
            nonlocal read, read_bytes
            while True:
                with lock:
                    if not queue:
                        return
                    k = queue.pop()
                inst, who = nodes[k % count], names[k]
                try:
                    c = imaplib.IMAP4(*inst.addr("imap"), timeout=60)
                    c.starttls(inst.client_ssl_context())
                    c.login(who, PASSWORD)
                    typ, data = c.select("INBOX", readonly=True)
                    got: dict[int, int] = {}
                    typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
                    for item in data:
                        if isinstance(item, tuple):
                            body = item[1]
                            subject = body.split(b"Subject: bench ", 1)[1].split(b"\r\n", 1)[0]
                            uid = int(item[0].split(b"UID ")[1].split()[0].rstrip(b")"))
                            got[int(subject)] = uid
                            with lock:
                                read_bytes += len(body)
                    c.logout()
                except (imaplib.IMAP4.error, OSError, IndexError, ValueError) as exc:
                    with lock:
                        problems.append(f"{who} on node {k % count}: {exc}")
                    continue
                want = sorted(sent_to[who])
                uids = [got[i] for i in want if i in got]
                with lock:
                    read += len(got)
                    if sorted(got) != want:
                        problems.append(f"{who}: {len(got)} read, {len(want)} sent")
                    if len(set(uids)) != len(uids):
                        problems.append(f"{who}: a UID given twice")

        t1 = time.perf_counter()
        threads = [threading.Thread(target=reader) for _ in range(min(clients, users))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        imap_time = time.perf_counter() - t1

        nodes_cpu, pg_cpu, s3_cpu, cli_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
        per = max(ok, 1)
        print(f"SMTP: {ok} accepted of {messages} in {smtp_time:.1f} s = {ok / smtp_time:.1f} msg/s; "
              f"latency p50 {1000 * _pct(latencies, 50):.0f} ms, p99 {1000 * _pct(latencies, 99):.0f} ms, "
              f"max {1000 * max(latencies, default=0):.0f} ms; {len(errors)} errors")
        print(f"CPU per accepted message: nodes {1000 * nodes_cpu / per:.1f} ms (all {count}), PostgreSQL "
              f"{1000 * pg_cpu / per:.1f} ms, {s3.name} S3 {1000 * s3_cpu / per:.1f} ms, clients "
              f"{1000 * cli_cpu / per:.1f} ms; machine: {os.cpu_count()} CPUs")
        print(f"IMAP: {read} messages ({read_bytes / 1e6:.1f} MB) read on other nodes in {imap_time:.1f} s = "
              f"{read / imap_time:.0f} msg/s; {len(problems)} problems")
        for line in (errors + problems)[:10]:
            print("  " + line)
        good = not errors and not problems and ok == messages
        if relay:
            assert sink is not None
            good = _relay(nodes, pg, s3, sink, names, relay, clients, size) and good
        return 0 if good else 1
    finally:
        for inst in nodes:
            inst.stop()
        s3.stop()
        if sink is not None:
            sink.stop()
        if dns is not None:
            dns.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def _relay(nodes: list[Instance], pg: PgServer, s3: ObjectStore, sink: Sink, names: list[str], n: int,
           clients: int, size: int) -> bool:
    """The shared queue under load: N messages submitted (587, STARTTLS, AUTH) round-robin to the
    nodes for a remote domain; every node's runner claims from the one queue in PostgreSQL and
    delivers to smtp-sink. Prints the submission rate, the delivery rate (first to N-th message at
    the sink), what each node delivered, and checks that nothing was delivered twice."""
    count = len(nodes)
    sent = [inst.log.read_text(errors="replace").count("status=sent") for inst in nodes]
    errors: list[str] = []
    lock = threading.Lock()
    next_i = iter(range(n))
    ctxs = [inst.client_ssl_context() for inst in nodes]

    def sender() -> None:
        conns: dict[tuple[int, str], smtplib.SMTP] = {}
        try:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                node, user = i % count, names[(i // count) % len(names)]
                try:
                    c = conns.get((node, user))
                    if c is None:
                        c = smtplib.SMTP(*nodes[node].addr("submission"), timeout=60)
                        c.starttls(context=ctxs[node])
                        c.login(user, PASSWORD)
                        conns[(node, user)] = c
                    rcpt = f"r{i}@{SINK_DOMAIN}"
                    c.sendmail(user, [rcpt], _message(i, rcpt, size).replace(b"load@example.net", user.encode(), 1))
                except (smtplib.SMTPException, OSError) as exc:
                    conns.pop((node, user), None)
                    with lock:
                        errors.append(f"relay message {i} via node {node}: {exc}")
        finally:
            _quit(conns.values())

    cpu0 = (_nodes_cpu(nodes), _pg_cpu(pg), cpu_seconds(s3.proc.pid))
    t0 = time.monotonic()
    threads = [threading.Thread(target=sender) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    submit_time = time.monotonic() - t0
    accepted = n - len(errors)
    try:
        sink.wait(accepted, timeout=max(120.0, accepted / 10))
    except RuntimeError as exc:
        errors.append(str(exc))
    done = time.monotonic()
    cpu1 = (_nodes_cpu(nodes), _pg_cpu(pg), cpu_seconds(s3.proc.pid))
    time.sleep(2.0)  # a duplicate would arrive meanwhile
    assert sink.first is not None or errors
    span = max(sink.times.values(), default=t0) - (sink.first or t0)
    per_node = [inst.log.read_text(errors="replace").count("status=sent") - k
                for inst, k in zip(nodes, sent, strict=True)]
    nodes_cpu, pg_cpu, s3_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    per = max(accepted, 1)
    print(f"Relay: {accepted} of {n} submitted in {submit_time:.1f} s = {accepted / submit_time:.1f} msg/s; "
          f"at the sink {sink.count} in {span:.1f} s from the first = {sink.count / max(span, 1e-9):.1f} msg/s, "
          f"all there {done - t0:.1f} s after the first submission")
    print(f"  delivered per node: {', '.join(str(k) for k in per_node)}; CPU per message: nodes "
          f"{1000 * nodes_cpu / per:.1f} ms (all {count}, submission and delivery), PostgreSQL "
          f"{1000 * pg_cpu / per:.1f} ms, {s3.name} S3 {1000 * s3_cpu / per:.1f} ms")
    if sink.count != accepted:
        errors.append(f"the sink got {sink.count} messages for {accepted} accepted")
    for line in errors[:10]:
        print("  " + line)
    return not errors
