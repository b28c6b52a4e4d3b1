"""The DNS records a mail domain publishes (RFC 5321 §5.1 MX, RFC 7208 SPF, RFC 6376 DKIM, RFC 7489 DMARC,
RFC 6186/8314 SRV, RFC 8461 MTA-STS, RFC 8460 TLS-RPT) and a live check of them, with reverse DNS and DNS
blocklists of the sending address.

`expected_records()` says what to publish; `zone_lines()` writes it as zone-file text;
`check_domain()` asks the DNS (through our Resolver) and returns one `Finding` per record.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from postier import mtasts
from postier.config import Config
from postier.mailauth.dmarc import DMARCRecordError, parse_record, psl_organizational_domain
from postier.mailauth.keys import DKIMKey
from postier.mailauth.spf import SPFStatus, check_spf
from postier.resolver import BaseResolver, DNSStatus, reverse_name

__all__ = ["Record", "Status", "Finding", "public_addresses", "rua_address", "dmarc_value", "expected_records",
           "zone_lines", "check_domain", "dnsbl_name", "key_fingerprint"]

TTL = 3600


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    rtype: str
    value: str
    comment: str = ""
    placeholder: bool = False  # the admin must fill the value in


class Status(StrEnum):
    OK = "OK"
    MISSING = "MISSING"
    WRONG = "WRONG"
    LISTED = "LISTED"
    UNKNOWN = "UNKNOWN"  # the DNS did not answer (temporary failure)


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    what: str     # "MX", "SPF", "DKIM", ...
    name: str     # the DNS name looked at
    detail: str = ""
    expected: str = ""

    def line(self) -> str:
        text = f"{self.status.value:<8} {self.what:<6} {self.name}"
        if self.detail:
            text += f": {self.detail}"
        if self.expected and self.status is not Status.OK:
            text += f"\n{'':16}expected: {self.expected}"
        return text


def public_addresses(cfg: Config) -> list[str]:
    """The addresses this host sends and receives from, as far as the configuration tells (global only)."""
    out: list[str] = []
    candidates = [cfg.outbound.source_address]
    smtp = cfg.listeners.get("smtp")
    if smtp is not None:
        candidates.append(smtp.address)
    for a in candidates:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.is_global and str(ip) not in out:
            out.append(str(ip))
    return out


def rua_address(cfg: Config, domain: str) -> str:
    ra = cfg.mailauth.report_address
    return ra if "@" in ra else f"{ra}@{domain}"


def dmarc_value(cfg: Config, domain: str) -> str:
    return f"v=DMARC1; p={cfg.mailauth.dmarc_policy}; rua=mailto:{rua_address(cfg, domain)}"


def expected_records(cfg: Config, domain: str, keys: Sequence[DKIMKey], addresses: Sequence[str],
                     tlsa: Sequence[tuple[str, str]] = ()) -> list[Record]:
    host = cfg.hostname
    recs = [Record(domain, "MX", f"10 {host}.", "RFC 5321 §5.1: where mail for the domain goes")]
    if addresses:
        for a in addresses:
            recs.append(Record(host, "AAAA" if ":" in a else "A", a, "the mail host's address"))
    else:
        recs.append(Record(host, "A", "<public IPv4 address of this server>", "fill in the address (and an "
                           "AAAA record for IPv6)", placeholder=True))
    recs.append(Record(domain, "TXT", cfg.mailauth.spf_record, "SPF (RFC 7208): who may send for the domain"))
    recs.append(Record(host, "TXT", "v=spf1 a -all", "SPF for the HELO name (RFC 7208 §2.3)"))
    for k in keys:
        if k.state == "retired":
            recs.append(Record(k.dns_name, "TXT", k.txt, "retired DKIM key: may be removed", placeholder=True))
        else:
            recs.append(Record(k.dns_name, "TXT", k.txt, f"DKIM (RFC 6376) {k.algorithm}, {k.state}"))
    recs.append(Record(f"_dmarc.{domain}", "TXT", dmarc_value(cfg, domain), "DMARC (RFC 7489)"))
    rua_domain = rua_address(cfg, domain).rpartition("@")[2].lower()
    if psl_organizational_domain(rua_domain) != psl_organizational_domain(domain):
        # RFC 7489 §7.1: the report receiver's domain must agree to take reports about ours
        recs.append(Record(f"{domain}._report._dmarc.{rua_domain}", "TXT", "v=DMARC1",
                           f"in the zone of {rua_domain}: lets reports about {domain} go there (RFC 7489 §7.1)"))
    recs += service_records(cfg, domain)
    recs += tlsa_records(cfg, tlsa)
    if addresses:
        for a in addresses:
            recs.append(Record(reverse_name(a), "PTR", f"{host}.", "reverse DNS: set by whoever owns the "
                               "address (your hosting provider)"))
    else:
        recs.append(Record("<reverse name of the address>", "PTR", f"{host}.", "reverse DNS: ask your hosting "
                           "provider to point the address at the mail host", placeholder=True))
    return recs


def _txt_strings(value: str) -> str:
    """A TXT value as zone-file character-strings of at most 255 octets (RFC 1035 §3.3.14)."""
    parts = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    quoted = ['"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts]
    return quoted[0] if len(quoted) == 1 else "( " + " ".join(quoted) + " )"


def zone_lines(records: Sequence[Record]) -> list[str]:
    out = []
    for r in records:
        value = _txt_strings(r.value) if r.rtype == "TXT" else r.value
        line = f"{r.name}.\t{TTL}\tIN\t{r.rtype}\t{value}"
        if r.comment:
            out.append(f"; {r.comment}")
        out.append(("; " if r.placeholder else "") + line)
    return out


def dnsbl_name(ip: str, zone: str) -> str:
    """The name to look up for `ip` on a DNSBL (RFC 5782 §2.1 IPv4, §2.4 IPv6 nibbles)."""
    rev = reverse_name(ip)
    return rev.rsplit(".", 2)[0] + "." + zone.rstrip(".")


def _dkim_p(txt: str) -> str:
    tags = {}
    for part in txt.split(";"):
        k, _, v = part.partition("=")
        tags[k.strip().lower()] = "".join(v.split())
    return tags.get("p", "")


async def _txts(resolver: BaseResolver, name: str) -> tuple[DNSStatus, list[str]]:
    answer = await resolver.txt(name)
    return answer.status, [bytes(r).decode("utf-8", "replace") for r in answer.records]


def _absent(status: DNSStatus) -> bool:
    return status in (DNSStatus.NXDOMAIN, DNSStatus.NODATA)


async def check_domain(cfg: Config, domain: str, resolver: BaseResolver, keys: Sequence[DKIMKey],
                       addresses: Sequence[str] = (), tlsa: Sequence[tuple[str, str]] = ()) -> list[Finding]:
    """Query the live DNS for everything `expected_records` lists, plus rDNS and blocklists."""
    host = cfg.hostname
    found: list[Finding] = []
    expected = {r.rtype + r.name: r for r in expected_records(cfg, domain, keys, addresses)}

    # MX
    mx = await resolver.mx(domain)
    want_mx = f"10 {host}"
    if mx.status is DNSStatus.TEMPFAIL:
        found.append(Finding(Status.UNKNOWN, "MX", domain, mx.reason))
    elif _absent(mx.status):
        found.append(Finding(Status.MISSING, "MX", domain, "no MX record", want_mx))
    elif any(r.exchange == host for r in mx.records):
        found.append(Finding(Status.OK, "MX", domain, ", ".join(f"{r.preference} {r.exchange}" for r in mx.records)))
    else:
        found.append(Finding(Status.WRONG, "MX", domain, ", ".join(f"{r.preference} {r.exchange}"
                                                                   for r in mx.records), want_mx))

    # The mail host's addresses; when none were given, the published ones are the sending addresses.
    addrs = await resolver.addresses(host)
    published = [str(ipaddress.ip_address(a)) for a in addrs.records]
    if addrs.status is DNSStatus.TEMPFAIL:
        found.append(Finding(Status.UNKNOWN, "A", host, addrs.reason))
    elif not published:
        found.append(Finding(Status.MISSING, "A", host, "no A/AAAA record",
                             ", ".join(addresses) or "the server's public address"))
    elif addresses and not set(addresses) <= set(published):
        found.append(Finding(Status.WRONG, "A", host, ", ".join(published), ", ".join(addresses)))
    else:
        found.append(Finding(Status.OK, "A", host, ", ".join(published)))
    ips = list(addresses) or published

    # SPF for the domain, and for the HELO name
    for name, what, want in ((domain, "SPF", cfg.mailauth.spf_record), (host, "SPF", "v=spf1 a -all")):
        if what == "SPF" and name == host and host == domain:
            continue
        status, txts = await _txts(resolver, name)
        spf = [t for t in txts if t.lower().startswith("v=spf1") and (len(t) == 6 or t[6] == " ")]
        if status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, what, name, "DNS temporary failure"))
        elif not spf:
            found.append(Finding(Status.MISSING, what, name, "no SPF record", want))
        elif len(spf) > 1:
            found.append(Finding(Status.WRONG, what, name, "several SPF records (RFC 7208 §4.5: permerror)", want))
        else:
            bad = []
            for ip in ips:
                result = await check_spf(ip, f"postmaster@{name}", host, resolver, receiver=host)
                if result.status is not SPFStatus.PASS:
                    bad.append(f"{ip}: {result.status.value}")
            if bad:
                found.append(Finding(Status.WRONG, what, name, f"{spf[0]!r} does not pass for " + ", ".join(bad),
                                     want))
            else:
                found.append(Finding(Status.OK, what, name, spf[0]))

    # DKIM
    live = [k for k in keys if k.state != "retired"]
    if not live:
        found.append(Finding(Status.MISSING, "DKIM", domain, "no DKIM key: run `postier dkim generate "
                             f"{domain}`"))
    for k in live:
        status, txts = await _txts(resolver, k.dns_name)
        if status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "DKIM", k.dns_name, "DNS temporary failure"))
        elif not txts:
            found.append(Finding(Status.MISSING, "DKIM", k.dns_name, f"no key record ({k.state} key)", k.txt))
        elif not any(_dkim_p(t) == _dkim_p(k.txt) for t in txts):
            found.append(Finding(Status.WRONG, "DKIM", k.dns_name, "the published key is not ours", k.txt))
        else:
            found.append(Finding(Status.OK, "DKIM", k.dns_name, f"{k.algorithm}, {k.state}"))

    # DMARC (at the domain itself: we publish it there)
    name = f"_dmarc.{domain}"
    want = expected["TXT" + name].value
    status, txts = await _txts(resolver, name)
    dmarc = [t for t in txts if t.lstrip().startswith("v=DMARC1")]
    if status is DNSStatus.TEMPFAIL:
        found.append(Finding(Status.UNKNOWN, "DMARC", name, "DNS temporary failure"))
    elif not dmarc:
        found.append(Finding(Status.MISSING, "DMARC", name, "no DMARC record", want))
    elif len(dmarc) > 1:
        found.append(Finding(Status.WRONG, "DMARC", name, "several DMARC records (RFC 7489 §6.6.3: none applies)",
                             want))
    else:
        try:
            rec = parse_record(dmarc[0])
            found.append(Finding(Status.OK, "DMARC", name, f"p={rec.policy.value}"
                                 + (f", reports to {', '.join(rec.rua)}" if rec.rua else ", no rua: no reports")))
        except DMARCRecordError as exc:
            found.append(Finding(Status.WRONG, "DMARC", name, str(exc), want))

    found += await check_service_records(cfg, domain, resolver, published)
    found += await check_tlsa(cfg, resolver, tlsa)

    # Reverse DNS of each sending address, forward-confirmed (what receivers check first)
    for ip in ips:
        rname = reverse_name(ip)
        ptr = await resolver.ptr(ip)
        if ptr.status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "PTR", rname, ptr.reason))
            continue
        if not ptr.ok:
            found.append(Finding(Status.MISSING, "PTR", rname, f"no reverse DNS for {ip}", host))
            continue
        if host not in ptr.records:
            found.append(Finding(Status.WRONG, "PTR", rname, f"{ip} -> {', '.join(ptr.records)}", host))
            continue
        fc = await resolver.fcrdns(ip)
        if fc.ok and host in fc.records:
            found.append(Finding(Status.OK, "PTR", rname, f"{ip} -> {host} -> {ip} (forward-confirmed)"))
        elif fc.status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "PTR", rname, "forward confirmation: DNS temporary failure"))
        else:
            found.append(Finding(Status.WRONG, "PTR", rname, f"{host} does not resolve back to {ip}", host))

    # DNS blocklists (RFC 5782)
    for ip in ips:
        for zone in cfg.mailauth.dnsbl:
            qname = dnsbl_name(ip, zone)
            answer = await resolver.a(qname)
            if answer.status is DNSStatus.TEMPFAIL:
                found.append(Finding(Status.UNKNOWN, "DNSBL", zone, f"{ip}: {answer.reason}"))
            elif _absent(answer.status):
                found.append(Finding(Status.OK, "DNSBL", zone, f"{ip} not listed"))
            elif all(ipaddress.ip_address(a) in ipaddress.ip_network("127.255.255.0/24") for a in answer.records):
                # Spamhaus: 127.255.255.x = the query was refused (e.g. through a public resolver)
                found.append(Finding(Status.UNKNOWN, "DNSBL", zone, f"{ip}: query refused "
                                     f"({', '.join(answer.records)})"))
            else:
                reason = await _txts(resolver, qname)
                why = f" ({reason[1][0][:200]})" if reason[1] else ""
                found.append(Finding(Status.LISTED, "DNSBL", zone, f"{ip} is listed: {', '.join(answer.records)}"
                                     + why))
    return found


# -- client set-up and transport security: SRV, the web host names, MTA-STS, TLS-RPT -------------------

#: RFC 6186 §3 and RFC 8314 §5.1: service label, listener role, priority (implicit TLS preferred).
SRV_SERVICES = (
    ("_submissions._tcp", "submissions", 0),
    ("_submission._tcp", "submission", 10),
    ("_imaps._tcp", "imaps", 0),
    ("_imap._tcp", "imap", 10),
    ("_pop3s._tcp", "pop3s", 20),
    ("_pop3._tcp", "pop3", 30),
    ("_autodiscover._tcp", "https", 0),
)


def srv_value(cfg: Config, role: str, priority: int) -> str:
    """"PRIO WEIGHT PORT TARGET."; "0 0 0 ." when we do not offer the service (RFC 6186 §4)."""
    lst = cfg.listeners.get(role)
    if lst is None or (role in ("submission", "imap", "pop3") and not (lst.starttls and cfg.tls.cert)):
        return "0 0 0 ."  # never point a client at a port without TLS
    return f"{priority} 1 {lst.port} {cfg.hostname}."


def web_names(cfg: Config, domain: str) -> list[str]:
    """The per-domain host names the HTTP layer answers for (and ACME certifies)."""
    if "https" not in cfg.listeners and "http" not in cfg.listeners:
        return []
    names = [f"autoconfig.{domain}", f"autodiscover.{domain}"]
    if "https" in cfg.listeners:
        names.insert(0, f"{mtasts.POLICY_HOST_PREFIX}{domain}")
    return names


def service_records(cfg: Config, domain: str) -> list[Record]:
    host = cfg.hostname
    recs = []
    for name in web_names(cfg, domain):
        recs.append(Record(name, "CNAME", f"{host}.", "served by the mail host's web listener "
                           "(MTA-STS policy, client autoconfiguration)"))
    if "https" in cfg.listeners:
        recs.append(Record(f"_mta-sts.{domain}", "TXT", mtasts.txt_record(cfg),
                           f"MTA-STS (RFC 8461 §3.1), mode {cfg.mta_sts.mode}; the id changes with the policy"))
    recs.append(Record(f"_smtp._tls.{domain}", "TXT", mtasts.tlsrpt_record(cfg, domain),
                       "TLS reporting (RFC 8460 §3): where other servers report TLS trouble with us"))
    for label, role, prio in SRV_SERVICES:
        value = srv_value(cfg, role, prio)
        what = "not offered" if value.endswith(" .") else "clients find the server (RFC 6186, RFC 8314 §5.1)"
        recs.append(Record(f"{label}.{domain}", "SRV", value, f"{role}: {what}"))
    return recs


def _sts_id(txt: str) -> str | None:
    """The id of a "v=STSv1; id=..." record (RFC 8461 §3.1), or None when malformed."""
    fields = [f.strip() for f in txt.split(";")]
    if fields[0] != "v=STSv1":
        return None
    for f in fields[1:]:
        k, _, v = f.partition("=")
        if k.strip() == "id" and v.strip().isalnum() and len(v.strip()) <= 32:
            return v.strip()
    return None


async def check_service_records(cfg: Config, domain: str, resolver: BaseResolver,
                                host_addresses: Sequence[str]) -> list[Finding]:
    found: list[Finding] = []
    host = cfg.hostname
    for name in web_names(cfg, domain):
        ans = await resolver.addresses(name)
        if ans.status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "WEB", name, ans.reason))
        elif not ans.records:
            found.append(Finding(Status.MISSING, "WEB", name, "does not resolve", f"CNAME {host}."))
        elif host_addresses and not set(ans.records) & set(host_addresses):
            found.append(Finding(Status.WRONG, "WEB", name, ", ".join(ans.records), f"CNAME {host}."))
        else:
            found.append(Finding(Status.OK, "WEB", name, ", ".join(ans.records)))

    if "https" in cfg.listeners:
        name = f"_mta-sts.{domain}"
        want = mtasts.txt_record(cfg)
        status, txts = await _txts(resolver, name)
        sts = [t for t in txts if t.startswith("v=STSv1")]
        if status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "MTASTS", name, "DNS temporary failure"))
        elif not sts:
            found.append(Finding(Status.MISSING, "MTASTS", name, "no MTA-STS record", want))
        elif len(sts) > 1:  # RFC 8461 §3.1: several records = no policy
            found.append(Finding(Status.WRONG, "MTASTS", name, "several v=STSv1 records", want))
        elif _sts_id(sts[0]) != mtasts.policy_id(cfg):
            found.append(Finding(Status.WRONG, "MTASTS", name, f"{sts[0]!r}: not the current policy's id, "
                                 "senders keep their cached policy", want))
        else:
            found.append(Finding(Status.OK, "MTASTS", name, f"mode {cfg.mta_sts.mode}"))

    name = f"_smtp._tls.{domain}"
    want = mtasts.tlsrpt_record(cfg, domain)
    status, txts = await _txts(resolver, name)
    rpt = [t for t in txts if t.startswith("v=TLSRPTv1")]
    if status is DNSStatus.TEMPFAIL:
        found.append(Finding(Status.UNKNOWN, "TLSRPT", name, "DNS temporary failure"))
    elif not rpt:
        found.append(Finding(Status.MISSING, "TLSRPT", name, "no TLS-RPT record", want))
    elif len(rpt) > 1 or "rua=" not in rpt[0]:  # RFC 8460 §3: exactly one, with rua
        found.append(Finding(Status.WRONG, "TLSRPT", name, "several records or no rua", want))
    else:
        found.append(Finding(Status.OK, "TLSRPT", name, rpt[0]))

    for label, role, prio in SRV_SERVICES:
        name = f"{label}.{domain}"
        want = srv_value(cfg, role, prio)
        _, _, port, target = want.split()
        srv = await resolver.srv(name)
        recs = list(srv.records)
        if srv.status is DNSStatus.TEMPFAIL:
            found.append(Finding(Status.UNKNOWN, "SRV", name, srv.reason))
        elif target == ".":
            if any(r.target != "." for r in recs):  # a client would be sent to a service we do not run
                found.append(Finding(Status.WRONG, "SRV", name, "points at a service we do not offer", want))
            else:
                found.append(Finding(Status.OK, "SRV", name, "not offered"))
        elif not recs:
            found.append(Finding(Status.MISSING, "SRV", name, "no SRV record", want))
        elif any(r.target == target.rstrip(".") and r.port == int(port) for r in recs):
            found.append(Finding(Status.OK, "SRV", name, f"{host}:{port}"))
        else:
            found.append(Finding(Status.WRONG, "SRV", name, ", ".join(f"{r.target}:{r.port}" for r in recs), want))
    return found


def tlsa_name(cfg: Config) -> str | None:
    """RFC 7672 §2.2: _PORT._tcp.MXHOST of our MX listener, or None without one."""
    smtp = cfg.listeners.get("smtp")
    return f"_{smtp.port}._tcp.{cfg.hostname}" if smtp is not None else None


def tlsa_records(cfg: Config, tlsa: Sequence[tuple[str, str]]) -> list[Record]:
    """DANE-EE SPKI SHA-256 (3 1 1, RFC 7671 §5.1) for each key given; useful only in a DNSSEC-signed zone."""
    name = tlsa_name(cfg)
    if name is None:
        return []
    return [Record(name, "TLSA", f"3 1 1 {digest}", f"DANE (RFC 7672) for {what}; only in a DNSSEC-signed zone")
            for what, digest in tlsa]


async def check_tlsa(cfg: Config, resolver: BaseResolver, tlsa: Sequence[tuple[str, str]]) -> list[Finding]:
    name = tlsa_name(cfg)
    if name is None or not tlsa:
        return []
    ans = await resolver.tlsa(name)
    if ans.status is DNSStatus.TEMPFAIL:
        return [Finding(Status.UNKNOWN, "TLSA", name, ans.reason)]
    if _absent(ans.status):  # optional: DANE needs DNSSEC, which not every zone has
        return [Finding(Status.OK, "TLSA", name, "none published (DANE not used)")]
    published = {(r.usage, r.selector, r.mtype, r.data.hex()) for r in ans.records}
    found = []
    for what, digest in tlsa:
        if (3, 1, 1, digest) in published:
            found.append(Finding(Status.OK, "TLSA", name, f"3 1 1 for {what}"))
        else:  # a DANE sender would refuse our certificate once this key is in service
            found.append(Finding(Status.WRONG, "TLSA", name, f"no 3 1 1 record for {what}", f"3 1 1 {digest}"))
    return found


def key_fingerprint(txt: str) -> str:
    """A short fingerprint of a DKIM TXT value's key, for listings."""
    try:
        raw = base64.b64decode(_dkim_p(txt), validate=False)
    except ValueError:
        return "?"
    return hashlib.sha256(raw).hexdigest()[:16]
