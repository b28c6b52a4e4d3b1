"""Configuration: typed loading, and one-line errors that name the key (exit code 2)."""

from pathlib import Path

import pytest

from postier.config import ConfigError, load_config
from tests.harness import STAY_ROOT, run_cli

BASE = 'hostname = "mail.a.test"\ndata_dir = "."\n[listeners.smtp]\naddress = "127.0.0.1"\nport = 2525\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "postier.toml"
    p.write_text(text)
    return p


def test_minimal_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.hostname == "mail.a.test"
    assert cfg.data_dir == tmp_path
    assert cfg.listeners["smtp"].port == 2525
    assert cfg.limits.max_recipients == 1000
    assert cfg.limits.max_message_size == 50 * 1024 * 1024


@pytest.mark.parametrize(("extra", "key"), [
    ("bogus = 1\n", "bogus: unknown key"),
    ("[auth]\nargon2_time_cost = 0\n", "auth.argon2_time_cost: must be 1 to 100"),
    ("[auth]\nargon2_parallelism = 0\n", "auth.argon2_parallelism: must be 1 to 64"),
    ("[auth]\nargon2_memory_kib = 16\n", "auth.argon2_memory_kib: must be 32 (8 per lane)"),
    ("[limits]\nmax_recipients = \"x\"\n", "limits.max_recipients: expected an integer"),
    ("[limits]\nnope = 1\n", "limits.nope: unknown key"),
    ("[listeners.imap]\naddress = \"127.0.0.1\"\nport = 70000\n", "listeners.imap.port: must be 1-65535"),
    ("[listeners.smtps2]\nport = 1\n", "listeners.smtps2: unknown role"),
    ("[listeners.imap]\naddress = \"not-an-ip\"\nport = 1143\n", "listeners.imap.address: not an IP address"),
    ("[tls]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n", "tls.cert: cannot read"),
    ("[dns]\nnameservers = [\"x:y\"]\n", "dns.nameservers[0]"),
    ("[listeners.submission]\naddress = \"127.0.0.1\"\nport = 2525\n", "listeners.submission.port: 127.0.0.1:2525 is already used"),
    ("[listeners.imap]\npath = \"run/imap\"\n", "listeners.imap.path: only lmtp listens on a Unix socket"),
    ("[listeners.lmtp]\npath = \"run/lmtp\"\nport = 24\n", "listeners.lmtp.path: give either path or address"),
    ("[listeners.lmtp]\npath = \"" + "x" * 120 + "\"\n", "listeners.lmtp.path: longer than"),
    ("[server]\nworkers = 300\n", "server.workers: must be 0 (one per core) to 256"),
    ("[cluster]\ndsn = \"host=db\"\n", "cluster.s3_bucket: required in cluster mode"),
    ("[cluster]\ndsn = \"host=db\"\ns3_bucket = \"b\"\ntimeout = 0.0\n", "cluster.timeout: must be positive"),
    ("[cluster]\ndsn = \"host=db\"\ns3_bucket = \"b\"\nthrottle_interval = 0.01\n", "cluster.throttle_interval: 0"),
])
def test_errors_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    text = BASE.replace("[listeners.smtp]", extra + "[listeners.smtp]") if not extra.startswith("[") else BASE + extra
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert str(exc.value).startswith(key), str(exc.value)
    assert "\n" not in str(exc.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "hostname = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_cli_exit_code_2_on_bad_config(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "[limits]\nmax_errors = -1\n")
    r = run_cli(p, "domain", "list", check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "postier: config error: limits.max_errors: must not be negative"


def test_quickstart_writes_every_listener_with_offset(tmp_path: Path) -> None:
    run_cli(None, "quickstart", "--domain", "Example.TEST", "--data-dir", str(tmp_path / "d"),
            "--port-offset", "10000", "--listen", "127.0.0.1", *STAY_ROOT)
    cfg = load_config(tmp_path / "d" / "postier.toml")
    ports = {r: lst.port for r, lst in cfg.listeners.items()}
    assert ports == {"smtp": 10025, "submission": 10587, "submissions": 10465, "imap": 10143, "imaps": 10993,
                     "pop3": 10110, "pop3s": 10995, "lmtp": 0,
                     "http": 10080, "https": 10443, "managesieve": 14190}
    assert cfg.listeners["lmtp"].path == tmp_path / "d" / "run" / "lmtp"  # a Unix socket, as Dovecot's
    assert (tmp_path / "d" / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    r = run_cli(cfg.source, "domain", "list")
    assert r.stdout.split() == ["example.test"]


def test_antispam_section(tmp_path: Path) -> None:
    base = 'hostname = "mail.x.test"\ndata_dir = "."\n[listeners.smtp]\nport = 2525\n'
    p = tmp_path / "c.toml"
    p.write_text(base + '[antispam]\ndnsbl = [{zone = "zen.spamhaus.org", weight = 3, codes = ["127.0.0.2"]},'
                 ' {zone = "bl.spamcop.net"}]\ngreylist = true\nrspamd = "http://127.0.0.1:11333"\n')
    a = load_config(p).antispam
    assert a.dnsbl[0].weight == 3.0 and a.dnsbl[1].codes == () and a.greylist
    for bad, key in (('dnsbl = [{zone = "zen..x"}]', "antispam.dnsbl[0].zone"),
                     ('dnsbl = [{zone = "x.test", codes = ["10.0.0.1"]}]', "antispam.dnsbl[0].codes"),
                     ('dnswl = [{weight = 1}]', "antispam.dnswl[0].zone"),
                     ("threshold = 0", "antispam.threshold"),
                     ('rspamd = "ftp://x"', "antispam.rspamd"),
                     ('helo_checks = "maybe"', "antispam.helo_checks"),
                     ("greylist_delay = 600\ngreylist_retry_window = 60", "antispam.greylist_retry_window")):
        p.write_text(base + "[antispam]\n" + bad + "\n")
        with pytest.raises(ConfigError) as exc:
            load_config(p)
        assert str(exc.value).startswith(key), (bad, str(exc.value))


def test_argon2_cost_applies_to_new_hashes(tmp_path: Path) -> None:
    """`[auth] argon2_*` (defaults: RFC 9106 §4's second option) make the hashes of new passwords."""
    from postier.store.accountdb import open_accounts

    for extra, params in (("", "m=65536,t=3,p=4"),
                          ("[auth]\nargon2_time_cost = 1\nargon2_memory_kib = 8\nargon2_parallelism = 1\n", "m=8,t=1,p=1")):
        (tmp_path / "accounts.sqlite").unlink(missing_ok=True)
        acc = open_accounts(load_config(write(tmp_path, BASE + extra)))
        try:
            acc.add_domain("a.test")
            acc.add_user("u@a.test", "password123")
            stored = acc._conn().execute("SELECT password FROM users").fetchone()[0]
            assert f"$argon2id$v=19${params}$" in stored
            assert acc.verify_password("u@a.test", "password123") is not None
            assert acc.verify_password("nobody@a.test", "password123") is None  # the dummy hash
            assert f"${params}$" in acc.dummy_hash()
        finally:
            acc.close()
