"""Run a command that uses the system resolver against the test DNS server, in a private namespace.

    unshare --net --mount -- python -m tests.deliverability.netns_dns ZONEFILE CMD [ARG...]

Inside new network and mount namespaces (nothing is shared with the host, so port 53 is ours):
bring up loopback, serve ZONEFILE (zone-file lines) on 127.0.0.1:53, bind-mount a resolv.conf that
points there, and run CMD with our standard input and output. The exit status is CMD's. Programs
such as opendkim-testmsg and dkimpy's dkimverify read /etc/resolv.conf and know no other port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.deliverability.common import load_zone
from tests.dnsserver import DNSServer


class Port53(DNSServer):
    def _bind(self) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self.host, 53))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.host, 53))
        tcp.listen(16)
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp, self.port = udp, tcp, 53


def main(argv: list[str]) -> int:
    zone, cmd = Path(argv[0]).read_text(), argv[1:]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False) as f:
        f.write("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", f.name, "/etc/resolv.conf"], check=True, timeout=10)
    with Port53("127.0.0.1") as dns:
        load_zone(dns, zone)
        return subprocess.run(cmd, timeout=60).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
