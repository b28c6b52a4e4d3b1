"""Admin commands for deliverability: `postier dkim`, `postier dns`, `postier dmarc`, `postier tls`
(RFC 6376, 7208, 7489, 8460).

    postier dkim generate DOMAIN [--selector S] [--algorithm rsa|ed25519] [--bits N]
    postier dkim list [DOMAIN] | activate DOMAIN SELECTOR | retire DOMAIN SELECTOR
    postier dns records DOMAIN [--address IP]...      zone-file lines to publish
    postier dns check DOMAIN [--address IP]...        live check; exit 0 only when everything is OK
    postier dmarc reports [DOMAIN]                    aggregate reports others sent about our domains
    postier dmarc sent                                reports we sent
    postier tls reports [--domain D] [--json] [--sent]  TLS reports others sent about our domains (or ours)
    postier tls report-now                            send the TLS reports of the outcomes recorded so far
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from postier import cli as base
from postier.config import Config, normalize_domain
from postier.mailauth.keys import ALGORITHMS, KeyError_, State
from postier.mailauth.records import Status, check_domain, expected_records, key_fingerprint, public_addresses, \
    zone_lines
from postier.mailauth.tlsrpt import TLSReportStore, report_json
from postier.resolver import make_resolver
from postier.store.accountdb import open_key_store
from postier.store.reportdb import open_dmarc_reports, open_tls_reports
from postier.acme.store import tlsa_keys

__all__ = ["register"]


def _domain(name: str) -> str:
    try:
        return normalize_domain(name)
    except ValueError as exc:
        raise base.CLIError(str(exc)) from None


def _addresses(cfg: Config, given: list[str] | None) -> list[str]:
    out = []
    for a in given or []:
        try:
            out.append(str(ipaddress.ip_address(a)))
        except ValueError:
            raise base.CLIError(f"--address: not an IP address: {a!r}") from None
    return out or public_addresses(cfg)


# -- dkim -----------------------------------------------------------------------------------------

def cmd_dkim(args: argparse.Namespace) -> int:
    cfg = base._load(args)
    store = open_key_store(cfg)
    try:
        if args.dkim_action == "generate":
            domain = _domain(args.domain)
            key = store.generate(domain, ALGORITHMS[args.algorithm], args.selector, bits=args.bits)
            print(f"generated {key.algorithm} key {key.selector} for {domain} ({key.state})")
            if key.state != "active":
                print(f"  publish it, wait for the DNS, then: postier dkim activate {domain} {key.selector}")
            print("publish:")
            print("\n".join(zone_lines([r for r in expected_records(cfg, domain, [key], []) if r.rtype == "TXT"
                                        and r.name == key.dns_name])))
            acc = base._accounts(cfg)
            try:
                if domain not in acc.list_domains():
                    print(f"note: {domain} is not a local domain (postier domain add {domain})")
            finally:
                acc.close()
        elif args.dkim_action == "list":
            domains = [_domain(args.domain)] if args.domain else store.domains()
            for d in domains:
                for k in store.keys(d):
                    created = time.strftime("%Y-%m-%d", time.gmtime(k.created))
                    print(f"{d}\t{k.selector}\t{k.algorithm}\t{k.state}\t{created}\t{key_fingerprint(k.txt)}")
        else:
            state: State = "active" if args.dkim_action == "activate" else "retired"
            key = store.set_state(_domain(args.domain), args.selector, state)
            print(f"{key.domain} {key.selector}: {key.state}")
    except KeyError_ as exc:
        raise base.CLIError(str(exc)) from None
    return 0


# -- dns ------------------------------------------------------------------------------------------

def cmd_dns(args: argparse.Namespace) -> int:
    cfg = base._load(args)
    domain = _domain(args.domain)
    try:
        keys = open_key_store(cfg).keys(domain)
    except KeyError_ as exc:
        raise base.CLIError(str(exc)) from None
    addresses = _addresses(cfg, args.address)
    tlsa = tlsa_keys(cfg)
    if args.dns_action == "records":
        print(f"; DNS records for {domain}, mail host {cfg.hostname} (postier dns records)")
        print("\n".join(zone_lines(expected_records(cfg, domain, keys, addresses, tlsa))))
        if not keys:
            print(f"; no DKIM key yet: postier dkim generate {domain}")
        return 0
    resolver = make_resolver(cfg.dns.nameservers, cfg.dns.timeout, cfg.dns.cache)
    findings = asyncio.run(check_domain(cfg, domain, resolver, keys, addresses, tlsa))
    for f in findings:
        print(f.line())
    bad = [f for f in findings if f.status is not Status.OK]
    print(f"{len(findings) - len(bad)} OK, {len(bad)} problem(s)")
    return 0 if not bad else 1


# -- dmarc ----------------------------------------------------------------------------------------

def cmd_dmarc(args: argparse.Namespace) -> int:
    cfg = base._load(args)
    store = open_dmarc_reports(cfg)  # in cluster mode, every node's (store/cluster/reports.py)
    try:
        if args.dmarc_action == "sent":
            for at, to_domain, report_id, rua, messages, status in store.sent():
                print(f"{_when(at)}\t{to_domain}\t{rua}\t{messages} message(s)\t{status}\t{report_id}")
            return 0
        domain = _domain(args.domain) if args.domain else None
        reports = store.received(domain)
    finally:
        store.close()
    if not reports:
        print("no DMARC aggregate reports received" + (f" for {domain}" if domain else ""))
        return 0
    totals: defaultdict[str, _Totals] = defaultdict(_Totals)
    for rr in reports:
        rep = rr.report
        auth = "" if rr.authenticated else " (sender not authenticated)"
        print(f"{rep.policy.domain}: report {rep.report_id} from {rep.org_name} <{rep.email}>{auth}")
        print(f"  {_when(rep.begin)} to {_when(rep.end)} UTC, policy p={rep.policy.p}, {rep.messages} message(s)")
        t = totals[rep.policy.domain]
        t.reports += 1
        for row in rep.rows:
            ok = row.dkim == "pass" or row.spf == "pass"
            if ok:
                t.passed += row.count
            else:
                t.failed += row.count
                t.failing[row.source_ip] += row.count
            print(f"    {row.source_ip:<39} {row.count:>6}  dkim={row.dkim:<4} spf={row.spf:<4} "
                  f"disposition={row.disposition:<10} from={row.header_from}"
                  + ("  DMARC FAIL" if not ok else ""))
    print()
    for d, t in sorted(totals.items()):
        print(f"{d}: {t.reports} report(s), {t.passed + t.failed} message(s): {t.passed} pass, "
              f"{t.failed} fail")
        for ip, n in sorted(t.failing.items(), key=lambda kv: -kv[1]):
            print(f"  failing source {ip}: {n} message(s)")
    return 0


@dataclass
class _Totals:
    """One domain's sums over the received aggregate reports."""

    reports: int = 0
    passed: int = 0
    failed: int = 0
    failing: Counter[str] = field(default_factory=Counter)  # source IP -> failing messages


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


# -- tls (RFC 8460) ------------------------------------------------------------------------------

def cmd_tls(args: argparse.Namespace) -> int:
    cfg = base._load(args)
    store = open_tls_reports(cfg)
    try:
        if args.tls_action == "report-now":
            return _tls_report_now(cfg, store)
        if args.sent:
            sent = store.sent()
            if args.json:
                print(json.dumps([dataclasses.asdict(s) for s in sent], indent=1))
                return 0
            for s in sent:
                print(f"{_when(s.at)}\t{s.domain}\t{s.rua}\t{s.successes} ok, {s.failures} failed\t{s.status}"
                      f"\t{s.report_id}")
            return 0
        domain = _domain(args.domain) if args.domain else None
        reports = store.received(domain)
    finally:
        store.close()
    if args.json:
        print(json.dumps([{"received": rr.received, "authenticated": rr.authenticated,
                           "report": json.loads(report_json(rr.report))} for rr in reports], indent=1))
        return 0
    if not reports:
        print("no TLS reports received" + (f" for {domain}" if domain else ""))
        return 0
    for rr in reports:
        rep = rr.report
        auth = "" if rr.authenticated else " (sender not authenticated)"
        print(f"report {rep.report_id} from {rep.org_name} <{rep.contact}>{auth}")
        print(f"  {_when(rep.start)} to {_when(rep.end)} UTC: {rep.successes} successful, {rep.failed} failed "
              f"session(s)")
        for pr in rep.policies:
            pol = pr.policy
            mx = f" (mx {', '.join(pol.mx_host)})" if pol.mx_host else ""
            print(f"  {pol.domain}: policy {pol.type}{mx}: {pr.successes} successful, {pr.failed} failed")
            for f in pr.failures:
                where = f"{f.receiving_mx or '?'}[{f.receiving_ip or '?'}]" + (f" from {f.sending_ip}"
                                                                              if f.sending_ip else "")
                print(f"    {f.result_type:<26} {f.count:>6}  {where}" + (f": {f.reason}" if f.reason else ""))
    return 0


def _tls_report_now(cfg: Config, store: TLSReportStore) -> int:
    """Run the TLS half of the daily report job now, over everything recorded so far (today included);
    the reports go into the queue, which a running server delivers at its next scan."""
    from postier.mailauth.keys import DKIMSigner
    from postier.pipeline.jobs import ReportJob
    from postier.queue.cluster import open_spool
    from postier.queue.spool import SpoolEnqueuer

    accounts = base._accounts(cfg)
    spool = open_spool(cfg)
    try:
        resolver = make_resolver(cfg.dns.nameservers, cfg.dns.timeout, cfg.dns.cache)
        signer = DKIMSigner(open_key_store(cfg)) if cfg.mailauth.dkim_sign else None
        job = ReportJob(cfg, accounts.list_domains, SpoolEnqueuer(spool), None, resolver,
                        sign=signer.sign_bytes if signer is not None else None, tls=store)
        now = time.time()
        sent = asyncio.run(job.send_tls(now, int(now)))
    finally:
        spool.close()
        accounts.close()
    for domain, address in sent:
        print(f"{domain}: report queued for {address}")
    if not sent:
        print("no TLS report to send (nothing recorded for a domain with a _smtp._tls rua)")
    return 0


# -- registration ---------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dk = sub.add_parser("dkim", help="DKIM keys: generate, list, activate, retire")
    dks = dk.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    g = dks.add_parser("generate", help="create a key pair for DOMAIN (RSA 2048 by default)")
    g.add_argument("domain")
    g.add_argument("--selector", help="selector name (default: p<year><letter> for RSA, e<year><letter> ed25519)")
    g.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="rsa")
    g.add_argument("--bits", type=int, default=2048, help="RSA key size (1024-8192; default 2048)")
    lst = dks.add_parser("list", help="selectors and their state")
    lst.add_argument("domain", nargs="?")
    for action, text in (("activate", "sign with SELECTOR (the previous key of its algorithm stays published)"),
                         ("retire", "stop using SELECTOR")):
        p = dks.add_parser(action, help=text)
        p.add_argument("domain")
        p.add_argument("selector")
    dk.set_defaults(func=cmd_dkim)

    dn = sub.add_parser("dns", help="the DNS records to publish, and a live check of them")
    dns_sub = dn.add_subparsers(dest="dns_action", required=True, metavar="ACTION")
    for action, text in (("records", "print zone-file lines to publish for DOMAIN"),
                         ("check", "query the DNS and say what is OK, missing or wrong (exit 1 if anything is)")):
        p = dns_sub.add_parser(action, help=text)
        p.add_argument("domain")
        p.add_argument("--address", action="append", metavar="IP",
                       help="the server's public address (repeatable; default: from the configuration or DNS)")
    dn.set_defaults(func=cmd_dns)

    dm = sub.add_parser("dmarc", help="DMARC aggregate reports")
    dms = dm.add_subparsers(dest="dmarc_action", required=True, metavar="ACTION")
    r = dms.add_parser("reports", help="reports received about our domains: sources, pass/fail, failing IPs")
    r.add_argument("domain", nargs="?")
    dms.add_parser("sent", help="reports postier sent to other domains")
    dm.set_defaults(func=cmd_dmarc)

    tl = sub.add_parser("tls", help="SMTP TLS reports (RFC 8460): received, sent, send now")
    tls_sub = tl.add_subparsers(dest="tls_action", required=True, metavar="ACTION")
    r = tls_sub.add_parser("reports", help="TLS reports others sent about our domains (--sent: the ones we sent)")
    r.add_argument("--domain", help="only the policies about this domain")
    r.add_argument("--json", action="store_true", help="the reports as RFC 8460 §4.4 JSON")
    r.add_argument("--sent", action="store_true", help="the reports postier sent")
    tls_sub.add_parser("report-now", help="queue the TLS reports of every outcome recorded so far, today included")
    tl.set_defaults(func=cmd_tls)
