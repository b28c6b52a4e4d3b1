"""The message-view behaviours adopted from Dovecot 2.3 (issue: IMAP to Dovecot's standard), as
plain unit tests; tests/message/test_dovecot_diff.py checks the same against a running Dovecot."""

from __future__ import annotations

from postier.message.bodystructure import body_structure
from postier.message.envelope import address_text, envelope
from postier.message.matching import SearchContext, evaluate
from postier.message.mime import decode_qp, parse_message
from postier.message.sections import binary_section, body_section
from postier.proto.imap import Search, Section, parse_command

QP = (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
      b"hello  \r\nbar=  \r\nfoo=09bar\r\nfoo\t \tb\t \r\nfoo=20bar\r\nfoo b=\r\nar=3d\r\n")


def test_quoted_printable_trailing_space_and_soft_breaks() -> None:
    # RFC 2045 §6.7 rule 3: trailing white space is dropped; "=" + spaces + line end is a soft break
    assert decode_qp(b"hello  \r\nbar=  \r\nx") == b"hello\r\nbarx"
    assert decode_qp(b"a=3d=3D \t\r\n") == b"a==\r\n"
    assert decode_qp(b"a=ZZ") == b"a=ZZ"  # malformed: kept (RFC 2045 §6.7 note 2)
    root = parse_message(QP)
    data = binary_section(root, (1,))
    assert data == b"hello\r\nbarfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo bar=\r\n"
    assert len(data) == 47


def test_nul_octets_in_body_sections() -> None:
    raw = (b"Subject: nul\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n\x00hello\x00\r\n--x--\r\n")
    root = parse_message(raw)
    assert binary_section(root, (1,)) == b"\x00hello\x00"  # literal8 carries NUL (RFC 3516 §4.2)
    assert len(binary_section(root, (1,))) == 7
    assert body_section(root, Section((1,))) == b"\x80hello\x80"  # a literal cannot (RFC 9051 §4.3)
    assert b"\x00" not in body_section(root, Section())


def test_repeated_address_fields_all_count() -> None:
    env = envelope(parse_message(
        b"From: a@x\r\nTo: b@x, c@x\r\nCc: d@x\r\nTo: e@x\r\nSubject: one\r\nSubject: two\r\n\r\n"))
    assert [a.mailbox for a in env.to or ()] == [b"b", b"c", b"e"]
    assert env.subject == b"two"  # a repeated single field: the last one, as Dovecot


def test_subject_and_names_unfolded_for_humans() -> None:
    env = envelope(parse_message(
        b"Subject: a folded\r\n\tsubject  with\tblanks\r\nFrom: \"Fold\r\n\tName\" <f@x>\r\n"
        b"In-Reply-To: <a>\r\n\t<b>\r\nCc: (not a name) c@x\r\n\r\n"))
    assert env.subject == b"a folded subject with blanks"
    assert env.from_ is not None and env.from_[0].name == b"Fold Name"
    assert env.in_reply_to == b"<a>\t<b>"  # other fields: CRLF removed only (RFC 5322 §2.2.3)
    assert env.cc is not None and env.cc[0].name is None


def test_search_from_with_comments_in_the_address() -> None:
    raw = b"From: <user-from (comment)@ (comment) domain.org>\r\nTo: \"Q, N\" <q@d>\r\nSubject: s\r\n\r\nx\r\n"
    assert address_text(b"<user-from (comment)@ (comment) domain.org>") == "user-from@domain.org"

    def search(criteria: bytes) -> bool:
        cmd = parse_command(b"a SEARCH " + criteria + b"\r\n")
        assert isinstance(cmd, Search)
        return evaluate(cmd.criteria, _View(raw), SearchContext(1, 1))

    assert search(b"FROM user-from@domain.org")
    assert not search(b"FROM comment")  # comments are not part of the address
    assert search(b'TO "\\"Q, N\\" <q@d>"')


def test_rfc2231_parameters_merged_and_decoded() -> None:
    raw = (b"Content-Type: application/x-stuff;\r\n\ttitle*0*=us-ascii'en'This%20is%20;\r\n"
           b"\ttitle*1*=%2A%2A%2Afun%2A%2A%2A;\r\n\tname*0=\"long\"; name*1=\"name.txt\"\r\n"
           b"Content-Disposition: attachment; filename*0*=UTF-8''na%C3%AF; filename*1=\"ve.txt\"\r\n\r\nx\r\n")
    bs = bytes(body_structure(parse_message(raw)))
    assert b'("title" "This is ***fun***" "name" "longname.txt")' in bs
    assert b"(\"attachment\" (\"filename*\" \"UTF-8''na%C3%AFve.txt\"))" in bs


def test_nested_multipart_owns_the_crlf_after_its_close_delimiter() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n"
           b"Content-Type: multipart/mixed; boundary=abc\r\n\r\n--abc\r\n\r\ninner\r\n--abc--\r\n"
           b"--ab\r\n\r\nsecond\r\n--ab--\r\n")
    root = parse_message(raw)
    assert body_section(root, Section((1,))) == b"--abc\r\n\r\ninner\r\n--abc--\r\n"  # as Dovecot
    assert body_section(root, Section((2,))) == b"second"
    assert binary_section(root, ()) == raw  # nothing doubled or lost


class _View:
    seq = uid = 1
    flags: frozenset[str] = frozenset()
    size = 0
    modseq = 1

    def __init__(self, raw: bytes):
        import datetime as dt

        self.internal_date = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        self._raw = raw

    def raw(self) -> bytes:
        return self._raw
