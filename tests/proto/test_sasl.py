"""SASL server machines: PLAIN (RFC 4616), LOGIN, SCRAM-SHA-256 (RFC 7677 / RFC 5802), SASLprep."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto import sasl
from postier.proto.sasl import (
    Challenge,
    Failure,
    NeedPasswordCheck,
    NeedScramCredentials,
    ScramClient,
    Success,
    saslprep,
    scram_credentials_from_password,
    server_mechanism,
)

# RFC 7677 §3 test vector: user "user", password "pencil"
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
PENCIL = scram_credentials_from_password("pencil", salt=SALT)


def mech(name: str) -> sasl.ServerMechanism:
    m = server_mechanism(name, server_nonce=SERVER_NONCE)
    assert m is not None
    return m


# --- PLAIN ----------------------------------------------------------------------------------------


def test_plain_initial_response_success() -> None:
    m = mech("plain")
    assert m.step(b"\x00tim\x00tanstaaftanstaaf") == NeedPasswordCheck("tim", "tanstaaftanstaaf", "")
    assert m.password_result(True) == Success("tim", "")
    assert m.finished


def test_plain_without_initial_response_gets_empty_challenge() -> None:
    m = mech("PLAIN")
    assert m.step(None) == Challenge(b"")
    assert m.step(b"tim\x00tim\x00p w") == NeedPasswordCheck("tim", "p w", "tim")
    assert m.password_result(False) == Failure("invalid credentials")
    assert isinstance(m.step(b"x"), Failure)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"tim\x00secret",
        b"\x00tim\x00secret\x00",
        b"\x00\x00secret",
        b"\x00tim\x00",
        b"\x00t\xffim\x00secret",
        b"\x00tim\x00sec\r\nret",
        b"\x00" + b"u" * 2000 + b"\x00secret",
        b"x" * 5000,
    ],
)
def test_plain_malformed(data: bytes) -> None:
    assert isinstance(mech("PLAIN").step(data), Failure)


def test_plain_other_authzid_refused() -> None:
    assert mech("PLAIN").step(b"root\x00tim\x00secret") == Failure("authorization identity not permitted")


def test_password_result_unasked_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        mech("PLAIN").password_result(True)
    with pytest.raises(RuntimeError):
        mech("PLAIN").scram_credentials(None)


# --- LOGIN ----------------------------------------------------------------------------------------


def test_login_challenges() -> None:
    m = mech("LOGIN")
    assert m.step(None) == Challenge(b"Username:")
    assert m.step(b"tim") == Challenge(b"Password:")
    assert m.step(b"secret") == NeedPasswordCheck("tim", "secret", "")
    assert m.password_result(True) == Success("tim", "")


def test_login_initial_response_is_the_user_name() -> None:
    m = mech("LOGIN")
    assert m.step(b"tim") == Challenge(b"Password:")
    assert m.step(b"") == Failure("malformed LOGIN response")


# --- SCRAM-SHA-256 --------------------------------------------------------------------------------


def test_scram_credentials_from_rfc7677_password() -> None:
    assert PENCIL.iterations == 4096 and PENCIL.salt == SALT
    with pytest.raises(ValueError):
        scram_credentials_from_password("pencil", iterations=1000)
    assert len(scram_credentials_from_password("x").salt) == 16


def test_scram_server_rfc7677_vector() -> None:
    m = mech("SCRAM-SHA-256")
    assert m.step(CLIENT_FIRST) == NeedScramCredentials("user")
    assert m.scram_credentials(PENCIL) == Challenge(SERVER_FIRST)
    assert m.step(CLIENT_FINAL) == Success("user", "", SERVER_FINAL)
    assert isinstance(m.step(b""), Failure)


def test_scram_client_rfc7677_vector() -> None:
    client = ScramClient("user", "pencil", nonce=CLIENT_NONCE)
    assert client.first_message() == CLIENT_FIRST
    assert client.final_message(SERVER_FIRST) == CLIENT_FINAL
    assert client.verify_server_final(SERVER_FINAL)
    assert not client.verify_server_final(b"v=AAAA")


def scram_exchange(client: ScramClient, credentials: sasl.ScramCredentials | None) -> sasl.Outcome:
    m = mech("SCRAM-SHA-256")
    assert m.step(None) == Challenge(b"")
    assert isinstance(m.step(client.first_message()), NeedScramCredentials)
    challenge = m.scram_credentials(credentials)
    assert isinstance(challenge, Challenge)
    return m.step(client.final_message(challenge.data))


def test_scram_round_trip_with_escaped_name_and_authzid() -> None:
    creds = scram_credentials_from_password("s\u00e9cret,=")
    client = ScramClient("a=b,c", "s\u00e9cret,=", authzid="a=b,c")
    outcome = scram_exchange(client, creds)
    assert isinstance(outcome, Success)
    assert (outcome.authcid, outcome.authzid) == ("a=b,c", "a=b,c")
    assert outcome.additional is not None and client.verify_server_final(outcome.additional)


def test_scram_wrong_password_and_unknown_user_fail() -> None:
    assert scram_exchange(ScramClient("user", "wrong"), PENCIL) == Failure("invalid proof")
    assert scram_exchange(ScramClient("ghost", "pencil"), None) == Failure("invalid proof")


def test_scram_unknown_user_gets_a_stable_salt() -> None:
    salts = set()
    for _ in range(2):
        m = mech("SCRAM-SHA-256")
        m.step(b"n,,n=ghost,r=abc")
        challenge = m.scram_credentials(None)
        assert isinstance(challenge, Challenge)
        salts.add(challenge.data.split(b",")[1])
    assert len(salts) == 1


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-unique,,n=user,r=abc",
        b"x,,n=user,r=abc",
        b"n,b=x,n=user,r=abc",
        b"n,,m=ext,n=user,r=abc",
        b"n,,n=us=er,r=abc",
        b"n,,n=,r=abc",
        b"n,,n=user,r=",
        b"n,,r=abc,n=user",
        b"n,,n=user",
        b"n,a=other,n=user,r=abc",
        b"n,,n=\xff,r=abc",
        b"",
    ],
)
def test_scram_malformed_client_first(first: bytes) -> None:
    assert isinstance(mech("SCRAM-SHA-256").step(first), Failure)


@pytest.mark.parametrize(
    "final",
    [
        CLIENT_FINAL.replace(b"c=biws", b"c=eSws"),  # y flag, but the client said n
        CLIENT_FINAL.replace(b"c=biws", b"c=!!"),
        CLIENT_FINAL.replace(b"k0,p=", b"k1,p="),
        CLIENT_FINAL[:-4] + b"AAA=",
        CLIENT_FINAL.replace(b",p=", b",x="),
        b"c=biws",
        b"\xff",
    ],
)
def test_scram_malformed_client_final(final: bytes) -> None:
    m = mech("SCRAM-SHA-256")
    m.step(CLIENT_FIRST)
    m.scram_credentials(PENCIL)
    assert isinstance(m.step(final), Failure)


def test_scram_y_flag_accepted() -> None:
    m = mech("SCRAM-SHA-256")
    assert m.step(b"y,,n=user,r=abc") == NeedScramCredentials("user")


def test_unknown_mechanism() -> None:
    assert server_mechanism("CRAM-MD5") is None


# --- SASLprep (RFC 4013 §3 examples) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_text", "prepared"),
    [
        ("I\u00adX", "IX"),
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),
        ("\u2168", "IX"),
        ("a\u00a0b", "a b"),
    ],
)
def test_saslprep(given_text: str, prepared: str) -> None:
    assert saslprep(given_text) == prepared


@pytest.mark.parametrize("bad", ["\u0007", "\u0627\u0031", "a\u0221"])
def test_saslprep_prohibited(bad: str) -> None:
    with pytest.raises(ValueError):
        saslprep(bad)


# --- Random input: Failure or a next step, never an exception --------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sasl.MECHANISMS), st.lists(st.binary(max_size=80) | st.none(), max_size=5))
def test_random_steps_never_raise(name: str, steps: list[bytes | None]) -> None:
    m = mech(name)
    for data in steps:
        outcome = m.step(data)
        if isinstance(outcome, NeedScramCredentials):
            outcome = m.scram_credentials(PENCIL if data and len(data) % 2 else None)
        elif isinstance(outcome, NeedPasswordCheck):
            outcome = m.password_result(bool(data and len(data) % 2))
        assert isinstance(outcome, Challenge | Success | Failure)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_scram_final_never_raises(final: bytes) -> None:
    m = mech("SCRAM-SHA-256")
    m.step(CLIENT_FIRST)
    m.scram_credentials(PENCIL)
    assert isinstance(m.step(CLIENT_FINAL[:20] + final), Failure)


# -- the exchange every protocol runs (ServerExchange) ---------------------------------------------

def _scram_exchange(password: str, final_answer: bytes) -> list[sasl.Outcome]:
    creds = sasl.scram_credentials_from_password("user", salt=b"0123456789abcdef", iterations=4096)
    ex = sasl.ServerExchange.for_name("scram-sha-256")
    assert ex is not None and ex.name == "SCRAM-SHA-256"
    client = sasl.ScramClient("user", password)
    out = [ex.start(client.first_message())]
    assert isinstance(out[-1], sasl.NeedScramCredentials)
    out.append(ex.scram_credentials(creds))
    first = out[-1]
    assert isinstance(first, sasl.Challenge)
    out.append(ex.respond(client.final_message(first.data)))
    if isinstance(out[-1], sasl.Challenge):
        out.append(ex.respond(final_answer))
    return out


def test_exchange_sends_scram_server_signature_as_last_challenge() -> None:
    out = _scram_exchange("user", b"")
    assert isinstance(out[2], sasl.Challenge) and out[2].data.startswith(b"v=")
    assert out[3] == sasl.Success("user", "")  # additional data never reaches the protocol
    out = _scram_exchange("user", b"extra")
    assert isinstance(out[3], sasl.Failure)
    out = _scram_exchange("wrong", b"")
    assert isinstance(out[2], sasl.Failure) and len(out) == 3


def test_exchange_for_name_respects_the_offer() -> None:
    assert sasl.ServerExchange.for_name("PLAIN", ("SCRAM-SHA-256",)) is None
    assert sasl.ServerExchange.for_name("CRAM-MD5") is None
    ex = sasl.ServerExchange.for_name("plain", ("PLAIN",))
    assert ex is not None
    ask = ex.start(b"\0u\0p")
    assert ask == sasl.NeedPasswordCheck("u", "p", "")
    assert ex.password_result(True) == sasl.Success("u", "")


def test_decode_response() -> None:
    assert sasl.decode_response(b"") == b""
    assert sasl.decode_response(base64.b64encode(b"x")) == b"x"
    assert sasl.decode_response(b"not base64!") is None
