"""The MTA-STS policy text and its TXT id (RFC 8461 §3.1, §3.2), without sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from postier import mtasts
from postier.config import MTASTS, Config, Listener


def cfg(**sts: object) -> Config:
    return Config(hostname="mail.example.test", data_dir=Path("/nonexistent"),
                  listeners={"https": Listener(port=443)}, mta_sts=dataclasses.replace(MTASTS(), **sts))


def test_policy_and_id() -> None:
    c = cfg()
    assert mtasts.policy_text(c) == "version: STSv1\r\nmode: testing\r\nmx: mail.example.test\r\nmax_age: 604800\r\n"
    txt = mtasts.txt_record(c)
    assert txt.startswith("v=STSv1; id=")
    ident = txt.split("id=")[1]
    assert ident.isalnum() and 1 <= len(ident) <= 32
    assert mtasts.policy_id(c) == mtasts.policy_id(cfg())  # stable while the policy is
    enforce = cfg(mode="enforce")
    assert "mode: enforce\r\n" in mtasts.policy_text(enforce)
    assert mtasts.policy_id(enforce) != mtasts.policy_id(c)  # changes with it
    assert mtasts.policy_id(cfg(max_age=86400)) != mtasts.policy_id(c)
    assert mtasts.policy_id(dataclasses.replace(c, hostname="mx2.example.test")) != mtasts.policy_id(c)
    assert "mx:" not in mtasts.policy_text(cfg(mode="none"))
