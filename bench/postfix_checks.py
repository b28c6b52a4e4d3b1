"""The Postfix side of `python -m bench smtp --mailauth/--antispam`: the checks as a Postfix site runs them.

A Debian Postfix gets SPF, DKIM and DMARC checks from three add-on programs: `policyd-spf`
(postfix-policyd-spf-python, a policy service spawned by master(8)), OpenDKIM and OpenDMARC (milters);
and spam defence from postscreen(8) (DNS blocklists) and Rspamd's proxy worker as a milter. This module
configures those beside a throwaway Postfix (tests/postfix.py), on loopback, with their own
configuration files, so the benchmark compares postier's built-in checks with the set-up an admin would
otherwise build.

Every one of those programs reads /etc/resolv.conf, which cannot name a port. So the bench's DNS server
listens on port 53 of a loopback address of its own (127.0.0.153, as root), and the programs run in a
private mount namespace (util-linux `unshare`) in which a resolv.conf naming that address is bind-mounted
over /etc/resolv.conf: nothing leaves loopback and the machine's own file is never touched.

Localhost is exempt from all three by default (skip_addresses, InternalHosts, IgnoreHosts); those lists
are set to a documentation address here, so the bench's loopback client is checked like an outside one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

DNS_HOST = "127.0.0.153"
PROGRAMS = {"policyd-spf": "postfix-policyd-spf-python", "opendkim": "opendkim", "opendmarc": "opendmarc",
            "unshare": "util-linux"}
_NOBODY = "192.0.2.1"  # RFC 5737: no client of the bench comes from there


def missing() -> list[str]:
    """The Debian packages to install for this set-up ([] when everything is there)."""
    return [pkg for prog, pkg in PROGRAMS.items() if shutil.which(prog) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostfixChecks:
    """policyd-spf, OpenDKIM and OpenDMARC configured for one throwaway Postfix instance."""

    def __init__(self, root: Path, mailauth: bool = True, dnsbl: str | None = None,
                 rspamd_milter: int | None = None) -> None:
        """mailauth: policyd-spf, OpenDKIM, OpenDMARC; dnsbl: postscreen with this list (weight 3,
        threshold 3, as postier's [antispam] in the bench); rspamd_milter: the port of Rspamd's proxy."""
        self.mailauth, self.dnsbl, self.rspamd_milter = mailauth, dnsbl, rspamd_milter
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # read by policyd-spf, opendkim and opendmarc after they drop root
        self.resolv = root / "resolv.conf"
        self.resolv.write_text(f"nameserver {DNS_HOST}\noptions attempts:1 timeout:2\n")
        self.dkim_port, self.dmarc_port = free_port(), free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    def prefix(self) -> list[str]:
        """Run a command with the bench's resolv.conf in place of /etc/resolv.conf."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv)]

    def main_cf(self) -> dict[str, str]:
        milters = []
        cf: dict[str, str] = {}
        if self.mailauth:
            milters += [f"inet:127.0.0.1:{self.dkim_port}", f"inet:127.0.0.1:{self.dmarc_port}"]
            # The policy service first: permit_mynetworks would otherwise skip it for a loopback client.
            cf["smtpd_recipient_restrictions"] = "check_policy_service unix:private/policyd-spf, permit"
            cf["policyd-spf_time_limit"] = "3600"
        if self.rspamd_milter is not None:
            milters.append(f"inet:127.0.0.1:{self.rspamd_milter}")
        if milters:
            cf["smtpd_milters"] = ", ".join(milters)
            cf["milter_default_action"] = "tempfail"  # a check that cannot run defers, as postier does
            cf["milter_protocol"] = "6"
        if self.dnsbl is not None:
            cf.update({
                "postscreen_dnsbl_sites": f"{self.dnsbl}*3",
                "postscreen_dnsbl_threshold": "3",
                "postscreen_dnsbl_action": "enforce",
                "postscreen_access_list": "",  # else permit_mynetworks: the loopback client is never screened
                "postscreen_greet_action": "ignore",
            })
        return cf

    def master_cf(self) -> str:
        if not self.mailauth:
            return ""
        conf = self.root / "policyd-spf.conf"
        conf.write_text(
            "debugLevel = 0\nTestOnly = 1\nHELO_reject = Fail\nMail_From_reject = Fail\n"
            "PermError_reject = False\nTempError_Defer = False\n"
            f"skip_addresses = {_NOBODY}/32\n")
        conf.chmod(0o644)
        return f"policyd-spf unix - n n - 0 spawn user=policyd-spf argv=/usr/bin/policyd-spf {conf}\n"

    def start(self, timeout: float = 30) -> None:
        if not self.mailauth:
            return
        hosts = self.root / "hosts"
        hosts.write_text(f"{_NOBODY}\n")
        hosts.chmod(0o644)
        dkim = self.root / "opendkim.conf"
        dkim.write_text(
            f"Mode v\nSocket inet:{self.dkim_port}@127.0.0.1\nUserID opendkim\nSyslog no\n"
            f"Background no\nCanonicalization relaxed/simple\nInternalHosts {hosts}\n"
            "AlwaysAddARHeader yes\n")
        dmarc = self.root / "opendmarc.conf"
        dmarc.write_text(
            f"Socket inet:{self.dmarc_port}@127.0.0.1\nUserID opendmarc\nSyslog false\nBackground false\n"
            f"IgnoreHosts {hosts}\nPublicSuffixList /usr/share/publicsuffix/public_suffix_list.dat\n"
            "SPFIgnoreResults false\nSPFSelfValidate false\nRejectFailures false\n"
            "AuthservID postfix.test\nTrustedAuthservIDs postfix.test\n")
        for f in (dkim, dmarc):
            f.chmod(0o644)
        log = open(self.root / "milters.log", "ab")  # noqa: SIM115 (kept open for the children)
        for cmd in (["opendkim", "-f", "-x", str(dkim)], ["opendmarc", "-f", "-c", str(dmarc)]):
            self._procs.append(subprocess.Popen(self.prefix() + cmd, stdout=log, stderr=log))
        log.close()
        deadline = time.monotonic() + timeout
        for port in (self.dkim_port, self.dmarc_port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                        raise RuntimeError("a milter did not start: "
                                           + (self.root / "milters.log").read_text(errors="replace")[-2000:]) from None
                    time.sleep(0.1)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
