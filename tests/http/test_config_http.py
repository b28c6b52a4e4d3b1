"""The [http], [mta_sts], [tlsrpt] and [acme] tables: defaults and errors that name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from postier.config import Config, ConfigError, load_config

BASE = 'hostname = "mail.a.test"\ndata_dir = "."\n[listeners.http]\nport = 8080\n'


def load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "postier.toml"
    p.write_text(BASE + text)
    return load_config(p)


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.mta_sts.mode == "testing" and cfg.mta_sts.max_age == 604800
    assert not cfg.acme.enabled and cfg.acme.directory.startswith("https://acme-v02.")
    assert cfg.http.max_body == 65536


@pytest.mark.parametrize("text,error", [
    ('[mta_sts]\nmode = "strict"\n', "mta_sts.mode: must be"),
    ("[mta_sts]\nmax_age = 0\n", "mta_sts.max_age: must be 1-31557600 seconds"),
    ("[mta_sts]\nmax_age = 31557601\n", "mta_sts.max_age: must be 1-31557600 seconds"),
    ('[acme]\nchallenge = "dns-01"\n', "acme.challenge: must be"),
    ('[acme]\nenabled = true\ndirectory = "http://ca.test/dir"\n', "acme.directory: must be an https:// URL"),
    ('[acme]\nenabled = true\nchallenge = "tls-alpn-01"\n', "acme.challenge: tls-alpn-01 needs a [listeners.https]"),
    ('[acme]\nenabled = true\nca_bundle = "/nonexistent/ca.pem"\n', "acme.ca_bundle: cannot read"),
    ("[http]\nmax_body = 0\n", "http.max_body: must be at least 1"),
    ("[outbound]\nhttps_port = 70000\n", "outbound.https_port: must be 1-65535"),
    ("[http]\nmax_bodies = 1\n", "http.max_bodies: unknown key"),
])
def test_errors_name_their_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert str(exc.value).startswith(error), str(exc.value)


def test_https_needs_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listeners.https: implicit TLS needs \[tls\] cert and key"):
        load(tmp_path, "[listeners.https]\nport = 8443\n")
