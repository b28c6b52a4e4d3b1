"""RFC 9208 in the sans-IO IMAP core: GETQUOTA, GETQUOTAROOT, SETQUOTA, STATUS DELETED-STORAGE, the
QUOTA and QUOTAROOT responses and the capabilities."""

from __future__ import annotations

import pytest

from postier.proto.imap import commands as C
from postier.proto.imap import response as R
from postier.proto.imap.errors import ParseError
from postier.proto.imap.parser import parse_command
from postier.proto.imap.session import SessionCore, SessionSettings
from postier.proto.imap.states import State, allowed


def test_getquota_and_getquotaroot_parse() -> None:
    assert parse_command(b'a GETQUOTA ""\r\n') == C.GetQuota(tag="a", root="")
    assert parse_command(b"a GETQUOTA user\r\n") == C.GetQuota(tag="a", root="user")
    assert parse_command(b"a getquotaroot inbox\r\n") == C.GetQuotaRoot(tag="a", mailbox="INBOX")
    assert parse_command(b"a GETQUOTAROOT &AOk-t&AOk-\r\n").mailbox == "été"  # type: ignore[attr-defined]


def test_setquota_parses_resource_list() -> None:
    cmd = parse_command(b'a SETQUOTA "" (storage 512 MESSAGE 1000)\r\n')
    assert cmd == C.SetQuota(tag="a", root="", limits=(("STORAGE", 512), ("MESSAGE", 1000)))
    assert parse_command(b'a SETQUOTA "" ()\r\n') == C.SetQuota(tag="a", root="", limits=())


@pytest.mark.parametrize("line", [
    b"a GETQUOTA\r\n", b'a GETQUOTA "" x\r\n', b"a GETQUOTAROOT\r\n", b'a SETQUOTA "" (STORAGE)\r\n',
    b'a SETQUOTA "" (STORAGE x)\r\n', b'a SETQUOTA "" STORAGE 1\r\n',
    b'a SETQUOTA "" (' + b" ".join(b"R%d 1" % i for i in range(40)) + b")\r\n",
])
def test_bad_quota_commands(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(line)


def test_status_deleted_storage_item() -> None:
    cmd = parse_command(b"a STATUS INBOX (DELETED DELETED-STORAGE)\r\n")
    assert cmd.items == ("DELETED", "DELETED-STORAGE")  # type: ignore[attr-defined]


def test_quota_commands_need_login() -> None:
    for name in ("GETQUOTA", "GETQUOTAROOT", "SETQUOTA"):
        assert not allowed(State.NOT_AUTHENTICATED, name)
        assert allowed(State.AUTHENTICATED, name) and allowed(State.SELECTED, name)


def test_quota_responses() -> None:
    assert R.quota("", [("STORAGE", 10, 512)]) == b'* QUOTA "" (STORAGE 10 512)\r\n'
    assert R.quotaroot("INBOX", [""]) == b'* QUOTAROOT "INBOX" ""\r\n'
    assert R.quotaroot("été", []) == b'* QUOTAROOT "&AOk-t&AOk-"\r\n'
    assert R.quotaroot("été", [], utf8=True) == '* QUOTAROOT "été"\r\n'.encode()


def test_capabilities_after_login_only() -> None:
    core = SessionCore(SessionSettings(False, True, 1000, ("PLAIN",)), tls=True)
    assert "QUOTA" not in core.capabilities()
    core.logged_in()
    caps = core.capabilities()
    assert "QUOTA" in caps and "QUOTA=RES-STORAGE" in caps
