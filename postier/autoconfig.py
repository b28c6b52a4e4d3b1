"""Mail client self-configuration documents: Thunderbird autoconfig, Outlook autodiscover (XML and JSON),
Apple configuration profiles; the server settings they carry follow RFC 8314 (implicit TLS first).

Pure functions of the configuration (no I/O); `postier/http/clientsetup.py` serves them. Only
implicit TLS and STARTTLS endpoints are ever offered, never a plaintext one: a role whose listener
has STARTTLS turned off, or no certificate to offer, is left out. Every document is built with a real
serializer (ElementTree, json, plistlib), so an address from a request can never break its syntax.
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .config import Config

__all__ = ["Endpoint", "endpoints", "thunderbird_xml", "autodiscover_xml", "autodiscover_json",
           "mobileconfig", "parse_autodiscover_request", "AUTODISCOVER_RESPONSE_NS"]

#: (role, protocol, security): RFC 8314 §3.3/§4.1: implicit TLS is preferred over STARTTLS.
_ROLES = (
    ("imaps", "imap", "SSL"),
    ("imap", "imap", "STARTTLS"),
    ("pop3s", "pop3", "SSL"),
    ("pop3", "pop3", "STARTTLS"),
    ("submissions", "smtp", "SSL"),
    ("submission", "smtp", "STARTTLS"),
)

AUTODISCOVER_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "imap" | "pop3" | "smtp"
    host: str
    port: int
    security: str  # "SSL" (implicit TLS) | "STARTTLS"


def endpoints(cfg: Config) -> list[Endpoint]:
    """What a client may use, best first: implicit TLS, then STARTTLS; never a cleartext port."""
    if cfg.tls.cert is None:
        return []  # no certificate: no TLS at all, so nothing a client should be told to use
    out = []
    for role, proto, security in _ROLES:
        lst = cfg.listeners.get(role)
        if lst is None or (security == "STARTTLS" and not lst.starttls):
            continue
        out.append(Endpoint(proto, cfg.hostname, lst.port, security))
    return out


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    e = ET.SubElement(parent, tag)
    e.text = text
    return e


def _xml(root: ET.Element) -> bytes:
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return out


def thunderbird_xml(cfg: Config, domain: str) -> bytes:
    """Thunderbird's clientConfig 1.1 for `domain` (the username is the whole address, which Thunderbird
    fills in for %EMAILADDRESS%)."""
    root = ET.Element("clientConfig", version="1.1")
    prov = ET.SubElement(root, "emailProvider", id=domain)
    _text(prov, "domain", domain)
    _text(prov, "displayName", f"{domain} mail")
    _text(prov, "displayShortName", domain)
    for ep in endpoints(cfg):
        tag = "outgoingServer" if ep.protocol == "smtp" else "incomingServer"
        srv = ET.SubElement(prov, tag, type=ep.protocol)
        _text(srv, "hostname", ep.host)
        _text(srv, "port", str(ep.port))
        _text(srv, "socketType", ep.security)
        _text(srv, "authentication", "password-cleartext")  # over TLS only: see endpoints()
        _text(srv, "username", "%EMAILADDRESS%")
    return _xml(root)


def parse_autodiscover_request(body: bytes) -> str | None:
    """The EMailAddress of an Outlook autodiscover request, or None when absent or unreadable."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:  # no DTDs: entity expansion is not for strangers
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for e in root.iter():
        if e.tag.rsplit("}", 1)[-1] == "EMailAddress" and e.text:
            addr = e.text.strip()
            return addr if 3 <= len(addr) <= 320 and "@" in addr else None
    return None


def autodiscover_xml(cfg: Config, email: str | None) -> bytes:
    """Outlook's POX autodiscover answer (the "outlook/responseschema/2006a" account settings)."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    resp = ET.SubElement(root, "Response", xmlns=AUTODISCOVER_RESPONSE_NS)
    acct = ET.SubElement(resp, "Account")
    _text(acct, "AccountType", "email")
    _text(acct, "Action", "settings")
    for ep in endpoints(cfg):
        p = ET.SubElement(acct, "Protocol")
        _text(p, "Type", ep.protocol.upper())
        _text(p, "Server", ep.host)
        _text(p, "Port", str(ep.port))
        if email:
            _text(p, "LoginName", email)
        _text(p, "DomainRequired", "off")
        _text(p, "SPA", "off")
        # "SSL" is implicit TLS; Encryption=TLS asks for STARTTLS on that port
        _text(p, "Encryption", "SSL" if ep.security == "SSL" else "TLS")
        _text(p, "AuthRequired", "on")
    return _xml(root)


def autodiscover_json(cfg: Config, domain: str, protocol: str) -> dict[str, str] | None:
    """Outlook's autodiscover.json (v1): where the XML service is; None for a protocol we do not serve."""
    if protocol.lower() != "autodiscoverv1":
        return None
    https = cfg.listeners.get("https")
    port = "" if https is None or https.port == 443 else f":{https.port}"
    return {"Protocol": "AutodiscoverV1",
            "Url": f"https://autodiscover.{domain}{port}/autodiscover/autodiscover.xml"}


def mobileconfig(cfg: Config, email: str) -> bytes:
    """An Apple configuration profile (unsigned) with one IMAP account for `email`.

    Apple's UseSSL on a STARTTLS port means STARTTLS. The UUIDs are derived from the host and address,
    so a profile downloaded again replaces the installed one instead of adding a second account.
    """
    eps = endpoints(cfg)
    imap = next((e for e in eps if e.protocol == "imap"), None)
    smtp = next((e for e in eps if e.protocol == "smtp"), None)
    if imap is None or smtp is None:
        raise ValueError("no IMAP or submission listener with TLS to configure")
    ident = ".".join(reversed(cfg.hostname.split(".")))
    base = uuid.uuid5(uuid.NAMESPACE_DNS, cfg.hostname)
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.mail.{uuid.uuid5(base, email)}",
        "PayloadUUID": str(uuid.uuid5(base, "account:" + email)).upper(),
        "PayloadDisplayName": email,
        "EmailAccountDescription": email,
        "EmailAccountName": email,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": email,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": imap.host,
        "IncomingMailServerPortNumber": imap.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": email,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": smtp.host,
        "OutgoingMailServerPortNumber": smtp.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": email,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "PreventMove": False,
        "SMIMEEnabled": False,
    }
    profile = {
        "PayloadContent": [account],
        "PayloadDisplayName": f"Mail: {email}",
        "PayloadIdentifier": f"{ident}.profile.{uuid.uuid5(base, 'profile:' + email)}",
        "PayloadType": "Configuration",
        "PayloadUUID": str(uuid.uuid5(base, "profile:" + email)).upper(),
        "PayloadVersion": 1,
        "PayloadRemovalDisallowed": False,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)
