"""`postier cert status` and `postier cert renew`: the certificate in service and its ACME renewal (RFC 8555).

`cert renew` asks the running server to renew now (a request file in DATA_DIR/acme that the
renewal task picks up within a second: the challenges must be answered by the server's own
listeners) and waits for the outcome.
"""

from __future__ import annotations

import argparse
import datetime
import time

from ..config import load_config


def _when(ts: float) -> str:
    if not ts:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_cert(args: argparse.Namespace) -> int:
    # imported here: every `postier` command builds this parser, and the ACME client pulls in aiohttp
    from cryptography import x509

    from ..store.accountdb import open_accounts
    from ..cli import CLIError, _config_path
    from .store import certificate_files
    from .manager import cert_names, certificate_names
    from .store import CertStore, renewal_time

    cfg = load_config(_config_path(args))
    store = CertStore(cfg.data_dir)
    if args.action == "renew":
        if not cfg.acme.enabled:
            raise CLIError("ACME is off: set [acme] enabled = true (and directory, email)")
        asked = store.request_renewal()
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            st = store.state()
            if st.last_attempt >= asked and not store.request_path.exists():
                if st.last_error:
                    raise CLIError(f"renewal failed: {st.last_error} (the certificate in service stays)")
                print(f"renewed: {', '.join(st.names)}")
                return 0
            time.sleep(0.2)
        raise CLIError(f"no answer from the server within {args.wait:g} s: is `postier serve` running?")

    files = certificate_files(cfg)
    if files is None:
        print("certificate: none configured")
    else:
        leaf = x509.load_pem_x509_certificate(files[0].read_bytes())
        source = "ACME" if files[0] == store.cert_path else "[tls] files" + (
            " (self-signed)" if leaf.issuer == leaf.subject else "")
        print(f"certificate: {files[0]} ({source})")
        print(f"  names:       {', '.join(cert_names(leaf)) or leaf.subject.rfc4514_string()}")
        print(f"  issuer:      {leaf.issuer.rfc4514_string()}")
        print(f"  valid until: {_when(leaf.not_valid_after_utc.timestamp())}")
        if source == "ACME":
            print(f"  renewal at:  {_when(renewal_time(leaf))}")
    if not cfg.acme.enabled:
        print("acme: off")
        return 0
    acc = open_accounts(cfg)
    try:
        wanted = certificate_names(cfg, acc.list_domains())
    finally:
        acc.close()
    st = store.state()
    print(f"acme: {cfg.acme.directory} ({cfg.acme.challenge})")
    print(f"  names wanted: {', '.join(wanted)}")
    print(f"  last attempt: {_when(st.last_attempt)}; last success: {_when(st.last_success)}")
    if st.last_error:
        print(f"  last error:   {st.last_error}")
        print(f"  failures:     {st.failures}; next attempt {_when(st.next_attempt)}")
    return 1 if st.last_error else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cert", help="the TLS certificate in service and its ACME renewal")
    p.add_argument("action", choices=("status", "renew"))
    p.add_argument("--wait", type=float, default=180.0, help="seconds `renew` waits for the outcome (180)")
    p.set_defaults(func=cmd_cert)
