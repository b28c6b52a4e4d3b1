"""Keeps an ACME certificate (RFC 8555) for our names in date and live in every TLS listener.

`CertManager.run()` is a task of `postier serve`. At start-up the issued certificate, when there is one
in date, replaces the self-signed fallback in every TLS context; then the task orders a certificate
when there is none, when it reaches two thirds of its lifetime, when the names change (a domain was
added) or when `postier cert renew` asks. A new chain is written to disk (atomically, 0600) and then
loaded into every listener's context through `tlsreload.reload_certificates()`; a failure is logged on
one line, recorded for `postier cert status`, retried with doubling backoff, and never touches the
certificate in service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from cryptography import x509

from ..config import Config
from ..tlsreload import CertificateError, reload_certificates
from .challenges import Challenges
from .client import ACMEClient, ACMEError
from .store import CertStore, renewal_time

log = logging.getLogger("postier.acme")

__all__ = ["CertManager", "certificate_names"]

#: How often the task looks for a renewal request or a change of names (a stat and a list of domains).
TICK = 1.0
NAMES_EVERY = 60.0


def certificate_names(config: Config, domains: list[str]) -> list[str]:
    """The hostname, then mta-sts.DOMAIN (RFC 8461 §3.3) and autoconfig.DOMAIN of each local domain."""
    names = [config.hostname]
    for d in sorted(domains):
        for n in (f"mta-sts.{d}", f"autoconfig.{d}"):
            if n not in names:
                names.append(n)
    return names


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n).lower() for n in san.get_values_for_type(x509.DNSName)]


class CertManager:
    def __init__(self, config: Config, domains: Callable[[], list[str]], challenges: Challenges,
                 contexts: Callable[[], list[ssl.SSLContext]]):
        self.config = config
        self.domains = domains
        self.challenges = challenges
        self.contexts = contexts
        self.store = CertStore(config.data_dir)
        self.state = self.store.state()
        #: Called once a renewed certificate is installed here (other worker processes load it too).
        self.on_installed: Callable[[], None] | None = None

    def names(self) -> list[str]:
        return certificate_names(self.config, self.domains())

    def install_existing(self) -> bool:
        """Serve the issued certificate (if one is in date) instead of the fallback; True if it did."""
        files = self.store.current_files()
        if files is None:
            return False
        try:
            reload_certificates(self.contexts(), *files)
        except CertificateError as exc:
            log.warning("acme: the issued certificate is unusable, keeping the fallback: %s", exc)
            return False
        return True

    def due(self, names: list[str], now: float) -> bool:
        """Is an order due now: no certificate, other names, two thirds of its life gone, or a retry?"""
        if self.state.failures and now < self.state.next_attempt:
            return False  # backing off after a failure
        cert = self.store.certificate()
        if cert is None or sorted(cert_names(cert)) != sorted(names):
            return True
        return now >= renewal_time(cert) or now >= cert.not_valid_after_utc.timestamp()

    async def run(self) -> None:
        names = self.names()
        names_at = time.monotonic()
        while True:
            requested = self.store.take_request()
            if time.monotonic() - names_at > NAMES_EVERY:
                names, names_at = self.names(), time.monotonic()
            if requested or self.due(names, time.time()):
                try:
                    await self.renew(names)
                except Exception:  # a bug must not end renewals for the life of the process
                    log.exception("acme: renewal failed unexpectedly")
                    self.state.failures += 1
                    self.state.next_attempt = time.time() + self.config.acme.retry_max
            await asyncio.sleep(TICK)

    async def renew(self, names: list[str] | None = None) -> bool:
        """One attempt: order, save, swap in. True on success; on failure the old certificate stays.

        When the full set fails (say, a new domain's mta-sts name is not in DNS yet) and no certificate
        covers the hostname, a certificate for the hostname alone is ordered at once: the mail
        listeners need that one most. The full set is retried after the backoff.
        """
        names = names or self.names()
        acme = self.config.acme
        st = self.state
        st.last_attempt = time.time()
        st.names = names
        try:
            leaf = await self._obtain(names)
        except _FAILURES as exc:
            st.failures += 1
            delay = min(acme.retry_initial * 2 ** (st.failures - 1), acme.retry_max)
            st.next_attempt = time.time() + delay
            st.last_error = " ".join(str(exc).split())
            log.warning("acme: certificate for %s failed (attempt %d, next in %ds): %s", ",".join(names),
                        st.failures, int(delay), st.last_error)
            host = self.config.hostname
            current = self.store.certificate()
            if len(names) > 1 and (current is None or host not in cert_names(current)):
                try:
                    await self._obtain([host])
                    st.last_error += f" (meanwhile a certificate for {host} alone is in service)"
                except _FAILURES as exc2:
                    log.warning("acme: certificate for %s alone failed too: %s", host, " ".join(str(exc2).split()))
            await asyncio.to_thread(self.store.save_state, st)
            return False
        st.failures = 0
        st.last_error = ""
        st.last_success = time.time()
        st.next_attempt = renewal_time(leaf)
        await asyncio.to_thread(self.store.save_state, st)
        return True

    async def _obtain(self, names: list[str]) -> x509.Certificate:
        """Order a certificate for `names`, write it, and load it into every listener."""
        acme = self.config.acme
        account = self.store.account_key()
        key = self.store.cert_key()
        async with ACMEClient(acme.directory, account, email=acme.email,
                              ca_bundle=str(acme.ca_bundle) if acme.ca_bundle else None) as client:
            self.state.account_url = await client.register()
            chain = await client.issue(names, key, acme.challenge, self.challenges)
        leaf = x509.load_pem_x509_certificate(chain)
        if leaf.public_key() != key.public_key():
            raise ACMEError("the CA returned a certificate for another key")
        await asyncio.to_thread(self.store.save_certificate, chain)  # fsyncs: off the loop
        reload_certificates(self.contexts(), self.store.cert_path, self.store.key_path)
        if self.on_installed is not None:
            self.on_installed()
        log.info("acme: certificate for %s installed, issuer %s, valid until %s", ",".join(names),
                 leaf.issuer.rfc4514_string(), leaf.not_valid_after_utc.isoformat())
        return leaf


_FAILURES = (ACMEError, CertificateError, ValueError, OSError)
