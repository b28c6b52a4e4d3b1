"""Webmail benchmark: server time per request on a 100,000-message folder, and memory per web session.

Generates a Maildir of N small messages for one user (the generator of the IMAP benchmark), starts
postier, logs in over HTTPS and times, from the `Server-Timing` header the webmail adds to every
answer (the server's own time, without TLS or the client):

  * the first page of the folder list (50 messages, newest first) on a cold folder (index built),
  * the same page again (warm), R times: median and maximum,
  * a deep page (page 1000: messages 50,000-50,049 from the top),
  * opening one message,
  * a search (From/To/Cc/Subject) that fills a page from the newest messages, and one that must
    read every header,
  * the conversations view (RFC 5256 REFERENCES over the newest 2,000 messages), cold and warm,
  * the settings page (the Sieve script, preferences and folders),

then the process RSS growth for S more logged-in sessions (each with one folder page viewed).
The full-text index (store/fts.py) is built from the generated Maildir before the server starts, as
`postier reindex` does for a Maildir copied in (--no-text-index: searches then read the messages).

    python -m bench.webmail_bench [--messages 100000] [--repeats 20] [--sessions 200] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.imap_bench import DOMAIN, PASSWORD, generate  # noqa: E402
from postier.accounts import Accounts  # noqa: E402
from postier.store.fts import FTS_NAME, build_file  # noqa: E402
from tests.harness import Instance  # noqa: E402

USER = f"bob@{DOMAIN}"


def server_ms(r: httpx.Response) -> float:
    t = r.headers.get("server-timing", "")
    if r.status_code != 200 or "dur=" not in t:
        raise RuntimeError(f"{r.request.url}: {r.status_code} {t!r}")
    return float(t.split("dur=")[1].split(";")[0])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def client(inst: Instance) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{inst.port('https')}", verify=inst.client_ssl_context(),
                        timeout=600, headers={"Host": f"mail.{DOMAIN}"})


def login(inst: Instance) -> httpx.Client:
    c = client(inst)
    r = c.post("/mail/login", data={"address": USER, "password": PASSWORD}, follow_redirects=False)
    if r.status_code != 303:
        raise RuntimeError(f"login: {r.status_code}")
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.webmail_bench")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--no-text-index", action="store_true", help="do not build the full-text index first")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="postier-webmail-bench-"))
    try:
        inst = Instance(root / "postier", DOMAIN, extra_config=(
            f"[limits]\nmax_connections = {args.sessions + 100}\nmax_connections_per_ip = {args.sessions + 100}\n"))
        accounts = Accounts(inst.root / "accounts.sqlite")
        accounts.set_hash_cost(1, 8, 1)  # argon2's cheapest: the bench measures the webmail, not argon2
        accounts.add_user(USER, PASSWORD)
        accounts.close()
        print(f"generating {args.messages} messages ...", flush=True)
        generate(inst.maildir(USER), args.messages)
        if not args.no_text_index:
            t0 = time.monotonic()
            md = inst.maildir(USER)
            build_file(md.parent / FTS_NAME, [md])
            print(f"full-text index built in {time.monotonic() - t0:.1f}s", flush=True)
        inst.start()
        try:
            assert inst.proc is not None
            c = login(inst)
            try:
                cold = server_ms(c.get("/mail/folder", params={"f": "INBOX"}))
                warm = [server_ms(c.get("/mail/folder", params={"f": "INBOX"})) for _ in range(args.repeats)]
                deep = [server_ms(c.get("/mail/folder", params={"f": "INBOX", "p": "1000"}))
                        for _ in range(args.repeats)]
                page = c.get("/mail/folder", params={"f": "INBOX"}).text
                uid = page.split("/mail/msg?f=INBOX&amp;u=")[1].split('"')[0]
                opened = [server_ms(c.get("/mail/msg", params={"f": "INBOX", "u": uid})) for _ in range(args.repeats)]
                common = server_ms(c.get("/mail/folder", params={"f": "INBOX", "q": "note"}))
                rare = server_ms(c.get("/mail/folder", params={"f": "INBOX", "q": "report 12340 x"}))
                threads_cold = server_ms(c.get("/mail/folder", params={"f": "INBOX", "t": "1"}))
                threads = [server_ms(c.get("/mail/folder", params={"f": "INBOX", "t": "1"}))
                           for _ in range(args.repeats)]
                settings = [server_ms(c.get("/mail/settings")) for _ in range(args.repeats)]
                before = rss_kib(inst.proc.pid)
                sessions = []
                for _ in range(args.sessions):
                    s = login(inst)
                    server_ms(s.get("/mail/folder", params={"f": "INBOX"}))
                    sessions.append(s)
                after = rss_kib(inst.proc.pid)
                for s in sessions:
                    s.close()
            finally:
                c.close()
            print(f"webmail, folder of {args.messages} messages, server time (Server-Timing), ms:")
            print(f"  first page, cold folder          {cold:8.1f}")
            print(f"  first page, warm   median / max  {statistics.median(warm):8.1f} / {max(warm):.1f}")
            print(f"  page 1000          median / max  {statistics.median(deep):8.1f} / {max(deep):.1f}")
            print(f"  open a message     median / max  {statistics.median(opened):8.1f} / {max(opened):.1f}")
            print(f"  search 'note' (a page of matches among the newest)  {common:8.1f}")
            print(f"  search 'report 12340 x' (one match: every header)   {rare:8.1f}")
            print(f"  conversations, cold                {threads_cold:8.1f}")
            print(f"  conversations, warm median / max  {statistics.median(threads):8.1f} / {max(threads):.1f}")
            print(f"  settings page      median / max  {statistics.median(settings):8.1f} / {max(settings):.1f}")
            print(f"  RSS growth for {args.sessions} more sessions: {after - before} KiB "
                  f"({(after - before) / max(1, args.sessions):.1f} KiB each)")
        finally:
            inst.stop()
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
