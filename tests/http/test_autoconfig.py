"""Client autoconfiguration fetched over real TLS from a running server: Thunderbird's autoconfig,
Outlook's autodiscover (XML POST and JSON), the Apple profile behind a login."""

from __future__ import annotations

import plistlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import Instance

DOMAIN = "example.test"
NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
REQUEST = b"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request><EMailAddress>alice@example.test</EMailAddress>
  <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request></Autodiscover>"""


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("autoconfig"), DOMAIN)
    i.add_user(f"alice@{DOMAIN}", "alice-password")
    i.start()
    yield i
    i.stop()


def client(inst: Instance, tls: bool = True) -> httpx.Client:
    return inst.web(tls=tls, timeout=10)


def check_thunderbird(inst: Instance, body: bytes) -> None:
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    prov = root.find("emailProvider")
    assert prov is not None and prov.get("id") == DOMAIN and prov.findtext("domain") == DOMAIN
    seen = set()
    for srv in prov.findall("incomingServer") + prov.findall("outgoingServer"):
        assert srv.findtext("hostname") == inst.hostname
        sock = srv.findtext("socketType")
        assert sock in ("SSL", "STARTTLS")  # never "plain"
        assert srv.findtext("authentication") == "password-cleartext"
        assert srv.findtext("username") == "%EMAILADDRESS%"
        seen.add((srv.get("type"), int(srv.findtext("port") or 0), sock))
    assert ("imap", inst.port("imaps"), "SSL") in seen
    assert ("imap", inst.port("imap"), "STARTTLS") in seen
    assert ("pop3", inst.port("pop3s"), "SSL") in seen
    assert ("smtp", inst.port("submissions"), "SSL") in seen
    assert ("smtp", inst.port("submission"), "STARTTLS") in seen
    assert not any(port == inst.port("smtp") for _, port, _ in seen)  # port 25 is not for clients
    first_in = prov.find("incomingServer")
    assert first_in is not None and first_in.findtext("socketType") == "SSL"  # RFC 8314: implicit TLS first


@pytest.mark.parametrize("host,path", [
    (f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml?emailaddress=alice%40example.test"),
    (f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml"),  # no emailaddress: still an answer
    (DOMAIN, "/.well-known/autoconfig/mail/config-v1.1.xml"),
    (DOMAIN, "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=someone%40elsewhere.example"),
])
def test_thunderbird_autoconfig(inst: Instance, host: str, path: str) -> None:
    for tls in (True, False):  # Thunderbird tries https, then http
        with client(inst, tls) as c:
            r = c.get(path, headers={"Host": host})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/xml")
            check_thunderbird(inst, r.content)


def test_outlook_autodiscover_post(inst: Instance) -> None:
    with client(inst) as c:
        r = c.post("/autodiscover/autodiscover.xml", headers={"Host": f"autodiscover.{DOMAIN}",
                                                              "Content-Type": "text/xml"}, content=REQUEST)
        assert r.status_code == 200
        root = ET.fromstring(r.content)
        protos = root.findall(f".//{NS}Account/{NS}Protocol")
        by_type = {}
        for p in protos:
            by_type.setdefault(p.findtext(f"{NS}Type"), []).append(p)
            assert p.findtext(f"{NS}LoginName") == "alice@example.test"
            assert p.findtext(f"{NS}Encryption") in ("SSL", "TLS")
            assert p.findtext(f"{NS}Server") == inst.hostname
        assert int(by_type["IMAP"][0].findtext(f"{NS}Port") or 0) == inst.port("imaps")
        assert int(by_type["SMTP"][0].findtext(f"{NS}Port") or 0) == inst.port("submissions")
        # no body, a broken body, an entity bomb: still settings, without a login name
        for body in (b"", b"<not xml", b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'):
            r = c.post("/autodiscover/autodiscover.xml", headers={"Host": f"autodiscover.{DOMAIN}"}, content=body)
            assert r.status_code == 200
            assert ET.fromstring(r.content).find(f".//{NS}LoginName") is None


def test_outlook_autodiscover_json(inst: Instance) -> None:
    with client(inst) as c:
        for path in ("/autodiscover/autodiscover.json/v1.0/alice@example.test?Protocol=AutodiscoverV1",
                     "/autodiscover/autodiscover.json?Email=alice@example.test&Protocol=AutodiscoverV1",
                     "/autodiscover/autodiscover.json"):
            r = c.get(path, headers={"Host": f"autodiscover.{DOMAIN}"})
            assert r.status_code == 200
            assert r.json() == {"Protocol": "AutodiscoverV1", "Url": f"https://autodiscover.{DOMAIN}:"
                                f"{inst.port('https')}/autodiscover/autodiscover.xml"}
        r = c.get("/autodiscover/autodiscover.json?Protocol=ActiveSync", headers={"Host": f"autodiscover.{DOMAIN}"})
        assert r.status_code == 400


def test_mobileconfig_needs_a_login(inst: Instance) -> None:
    with client(inst) as c:
        r = c.get("/mail.mobileconfig", headers={"Host": DOMAIN})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/mail.mobileconfig", headers={"Host": DOMAIN},
                     auth=("alice@example.test", "wrong")).status_code == 401
        r = c.get("/mail.mobileconfig", headers={"Host": DOMAIN}, auth=("alice@example.test", "alice-password"))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-apple-aspen-config"
        profile = plistlib.loads(r.content)
        assert profile["PayloadType"] == "Configuration"
        (acct,) = profile["PayloadContent"]
        assert acct["PayloadType"] == "com.apple.mail.managed"
        assert acct["EmailAddress"] == "alice@example.test"
        assert acct["IncomingMailServerHostName"] == inst.hostname
        assert acct["IncomingMailServerPortNumber"] == inst.port("imaps")
        assert acct["IncomingMailServerUseSSL"] is True and acct["OutgoingMailServerUseSSL"] is True
        assert acct["OutgoingMailServerPortNumber"] == inst.port("submissions")
        again = plistlib.loads(c.get("/mail.mobileconfig", headers={"Host": DOMAIN},
                                     auth=("alice@example.test", "alice-password")).content)
        assert again["PayloadUUID"] == profile["PayloadUUID"]  # a re-download replaces, not duplicates
    with client(inst, tls=False) as c:  # never over plain http: redirected before any password check
        r = c.get("/mail.mobileconfig", headers={"Host": DOMAIN})
        assert r.status_code == 308


def test_no_plaintext_endpoint_is_ever_offered() -> None:
    import dataclasses
    from pathlib import Path

    from postier import autoconfig
    from postier.config import TLS, Config, Listener

    cfg = Config(hostname="mail.example.test", data_dir=Path("/nonexistent"),
                 tls=TLS(Path("/c.pem"), Path("/k.pem")),
                 listeners={"imap": Listener(port=143, starttls=False), "submission": Listener(port=587),
                            "smtp": Listener(port=25)})
    assert [(e.protocol, e.port, e.security) for e in autoconfig.endpoints(cfg)] == [("smtp", 587, "STARTTLS")]
    assert autoconfig.endpoints(dataclasses.replace(cfg, tls=TLS())) == []  # no certificate, no TLS at all


def test_mta_sts_policy_is_served_on_its_host(inst: Instance) -> None:
    with client(inst) as c:
        r = c.get("/.well-known/mta-sts.txt", headers={"Host": f"mta-sts.{DOMAIN}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        # RFC 8461 §3.2: CRLF-separated key: value pairs
        assert r.text == f"version: STSv1\r\nmode: testing\r\nmx: {inst.hostname}\r\nmax_age: 604800\r\n"
        assert c.get("/.well-known/mta-sts.txt", headers={"Host": DOMAIN}).status_code == 404
