"""Our inbound MTA-STS policy (RFC 8461 §3.2) and the `_mta-sts` TXT record that announces it (§3.1).

Pure functions of the configuration: the HTTP layer serves `policy_text()` at
https://mta-sts.DOMAIN/.well-known/mta-sts.txt and `dns records` prints `txt_record()`. The policy id
is derived from the policy text itself, so it changes exactly when the policy does (§3.1: senders
refetch only when the id changes).
"""

from __future__ import annotations

import hashlib

from .config import Config

__all__ = ["policy_text", "policy_id", "txt_record", "POLICY_PATH", "POLICY_HOST_PREFIX", "tlsrpt_record"]

#: RFC 8461 §3.3: the well-known path on the policy host.
POLICY_PATH = "/.well-known/mta-sts.txt"
#: RFC 8461 §3.3: the policy host is "mta-sts" prepended to the policy domain.
POLICY_HOST_PREFIX = "mta-sts."


def policy_text(cfg: Config) -> str:
    """The policy body: CRLF-ended "key: value" lines (RFC 8461 §3.2); mx is our host name."""
    lines = ["version: STSv1", f"mode: {cfg.mta_sts.mode}"]
    if cfg.mta_sts.mode != "none":  # RFC 8461 §8.3: a "none" policy withdraws; mx lines are moot
        lines.append(f"mx: {cfg.hostname}")
    lines.append(f"max_age: {cfg.mta_sts.max_age}")
    return "".join(line + "\r\n" for line in lines)


def policy_id(cfg: Config) -> str:
    """RFC 8461 §3.1: 1-32 alphanumeric characters, changed whenever the policy changes."""
    return hashlib.sha256(policy_text(cfg).encode()).hexdigest()[:20]


def txt_record(cfg: Config) -> str:
    return f"v=STSv1; id={policy_id(cfg)}"


def tlsrpt_address(cfg: Config, domain: str) -> str:
    ra = cfg.tlsrpt.report_address
    return ra if "@" in ra else f"{ra}@{domain}"


def tlsrpt_record(cfg: Config, domain: str) -> str:
    """RFC 8460 §3: where sending MTAs mail their daily TLS reports about us."""
    return f"v=TLSRPTv1; rua=mailto:{tlsrpt_address(cfg, domain)}"
