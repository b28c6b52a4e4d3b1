"""Server-side SASL mechanisms (RFC 4422) as sans-IO challenge/response machines: PLAIN (RFC 4616),
LOGIN (draft-murchison-sasl-login) and SCRAM-SHA-256 (RFC 7677, RFC 5802) without channel binding.

Each protocol (SMTP AUTH, IMAP AUTHENTICATE, POP3 AUTH) decodes its own base64 and feeds raw bytes to
``step()``; the machine answers with one outcome value. Password checks and credential lookups stay with
the application (argon2 runs in a thread there): the machine asks with ``NeedPasswordCheck`` or
``NeedScramCredentials`` and the application reports back with ``password_result()`` or
``scram_credentials()``. Malformed client input always yields ``Failure``, never an exception; calling a
method the machine did not ask for is a programming error and raises ``RuntimeError``.

Why our own code: the Python SASL libraries are client-side only or tied to one protocol's I/O, and
SCRAM verification is a few HMACs over the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Failure",
    "NeedPasswordCheck",
    "NeedScramCredentials",
    "Outcome",
    "ScramClient",
    "ScramCredentials",
    "ServerExchange",
    "ServerMechanism",
    "Success",
    "decode_response",
    "saslprep",
    "scram_credentials_from_password",
    "server_mechanism",
]

MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN")

MAX_STEP_OCTETS = 4096  # one client response; real ones are < 300 octets
MAX_FIELD_OCTETS = 1024  # one identity or password (RFC 4616 §2 asks for at least 255)
SCRAM_MIN_ITERATIONS = 4096  # RFC 7677 §4
SCRAM_MAX_ITERATIONS = 1_000_000  # client side: refuse a server asking for absurd work


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client as a server challenge and feed its response to ``step()``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedPasswordCheck:
    """Check ``password`` for ``authcid`` (and may ``authcid`` act as ``authzid``), then call
    ``password_result(ok)``. ``authzid`` is "" or equal to ``authcid``: other values already failed."""

    authcid: str
    password: str
    authzid: str


@dataclass(frozen=True, slots=True)
class NeedScramCredentials:
    """Look up the stored SCRAM-SHA-256 credentials of ``username`` and call ``scram_credentials()``
    with them, or with None for an unknown user (the exchange then fails without telling why)."""

    username: str


@dataclass(frozen=True, slots=True)
class Success:
    """Authenticated. ``additional`` is RFC 4422 §3.6 additional data with success (the SCRAM server
    signature): protocols that cannot carry it in their success reply send it as a last challenge and
    expect an empty response."""

    authcid: str
    authzid: str
    additional: bytes | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Authentication failed; ``reason`` is for logs, not for the client."""

    reason: str


type Outcome = Challenge | NeedPasswordCheck | NeedScramCredentials | Success | Failure


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """RFC 5802 §3 stored form of a password: what the accounts layer keeps instead of the password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


# --- SASLprep (RFC 4013), needed to derive SCRAM keys (RFC 5802 §2.2 Normalize) -------------------

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str, *, allow_unassigned: bool = False) -> str:
    """RFC 4013 SASLprep of ``text``; raises ValueError for a string the profile prohibits."""
    if text.isascii() and all(0x20 <= ord(c) < 0x7F for c in text):
        return text  # printable ASCII maps to itself
    # RFC 4013 §2.1: non-ASCII spaces map to SPACE, B.1 characters map to nothing
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    normalized = unicodedata.normalize("NFKC", mapped)  # RFC 4013 §2.2
    for c in normalized:
        if any(table(c) for table in _PROHIBITED):  # RFC 4013 §2.3
            raise ValueError(f"prohibited character U+{ord(c):04X}")
        if not allow_unassigned and stringprep.in_table_a1(c):  # RFC 4013 §2.5
            raise ValueError(f"unassigned code point U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in normalized):  # RFC 3454 §6: bidi rules
        if any(stringprep.in_table_d2(c) for c in normalized):
            raise ValueError("mixed right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("right-to-left text must start and end with a right-to-left character")
    return normalized


# --- SCRAM primitives (RFC 5802 §2.2, §3) ---------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _salted_password(password: str, salt: bytes, iterations: int, *, query: bool) -> bytes:
    normalized = saslprep(password, allow_unassigned=query).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", normalized, salt, iterations)  # RFC 5802 §2.2 Hi()


def scram_credentials_from_password(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_MIN_ITERATIONS
) -> ScramCredentials:
    """Derive the stored SCRAM-SHA-256 credentials for ``password`` (RFC 5802 §3).

    Raises ValueError if SASLprep prohibits the password or ``iterations`` is below RFC 7677's 4096.
    """
    if iterations < SCRAM_MIN_ITERATIONS:
        raise ValueError(f"iterations must be at least {SCRAM_MIN_ITERATIONS} (RFC 7677 §4)")
    if salt is None:
        salt = os.urandom(16)
    salted = _salted_password(password, salt, iterations, query=False)
    client_key = _hmac(salted, b"Client Key")
    return ScramCredentials(
        salt=salt,
        iterations=iterations,
        stored_key=_h(client_key),
        server_key=_hmac(salted, b"Server Key"),
    )


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")  # RFC 5802 §5.1 saslname


def _unescape_saslname(value: str) -> str | None:
    """RFC 5802 §5.1: "=2C" is ",", "=3D" is "="; any other "=" is an error (None)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "=":
            seq = value[i : i + 3]
            if seq == "=2C":
                out.append(",")
            elif seq == "=3D":
                out.append("=")
            else:
                return None
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _is_printable_nonce(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in value)  # RFC 5802 §7


def _b64decode(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _decode_text(data: bytes) -> str | None:
    """UTF-8 text without NUL, CR or LF, within MAX_FIELD_OCTETS; None if not."""
    if len(data) > MAX_FIELD_OCTETS or any(b in data for b in (b"\x00", b"\r", b"\n")):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- The mechanisms -------------------------------------------------------------------------------


class ServerMechanism:
    """One authentication exchange on the server side; ``step()`` is called once per client message
    (first with the initial response or None)."""

    name: str = ""

    def __init__(self) -> None:
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def step(self, data: bytes | None) -> Outcome:
        if self._finished:
            return Failure("exchange already finished")
        if data is not None and len(data) > MAX_STEP_OCTETS:
            return self._fail("client response too long")
        return self._step(data)

    def password_result(self, ok: bool) -> Outcome:
        raise RuntimeError(f"{self.name} did not ask for a password check")

    def scram_credentials(self, credentials: ScramCredentials | None) -> Outcome:
        raise RuntimeError(f"{self.name} did not ask for SCRAM credentials")

    def _step(self, data: bytes | None) -> Outcome:
        raise NotImplementedError

    def _fail(self, reason: str) -> Failure:
        self._finished = True
        return Failure(reason)

    def _succeed(self, authcid: str, authzid: str, additional: bytes | None = None) -> Success:
        self._finished = True
        return Success(authcid, authzid, additional)


class _PasswordMechanism(ServerMechanism):
    """Shared tail of PLAIN and LOGIN: the application checks the password."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: NeedPasswordCheck | None = None

    def _ask(self, authcid: str, password: str, authzid: str) -> NeedPasswordCheck:
        self._pending = NeedPasswordCheck(authcid, password, authzid)
        return self._pending

    def password_result(self, ok: bool) -> Outcome:
        pending = self._pending
        if pending is None or self._finished:
            raise RuntimeError(f"{self.name} did not ask for a password check")
        self._pending = None
        if not ok:
            return self._fail("invalid credentials")
        return self._succeed(pending.authcid, pending.authzid)


class PlainMechanism(_PasswordMechanism):
    """RFC 4616: one message, authzid NUL authcid NUL passwd."""

    name = "PLAIN"

    def __init__(self) -> None:
        super().__init__()
        self._challenged = False

    def _step(self, data: bytes | None) -> Outcome:
        if self._pending is not None:
            return self._fail("unexpected client response")
        if data is None:
            if self._challenged:
                return self._fail("missing client response")
            self._challenged = True
            return Challenge(b"")  # RFC 4616 §2: empty challenge when no initial response
        parts = data.split(b"\x00")
        if len(parts) != 3:  # RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
            return self._fail("malformed PLAIN message")
        authzid, authcid, passwd = (_decode_text(p) for p in parts)
        if authzid is None or authcid is None or passwd is None or not authcid or not passwd:
            return self._fail("malformed PLAIN message")
        if authzid and authzid != authcid:  # no proxy authorization in postier
            return self._fail("authorization identity not permitted")
        return self._ask(authcid, passwd, authzid)


class LoginMechanism(_PasswordMechanism):
    """LOGIN (draft-murchison-sasl-login): "Username:" and "Password:" challenges."""

    name = "LOGIN"

    def __init__(self) -> None:
        super().__init__()
        self._username: str | None = None
        self._started = False

    def _step(self, data: bytes | None) -> Outcome:
        if self._pending is not None:
            return self._fail("unexpected client response")
        if not self._started:
            self._started = True
            if data is None:
                return Challenge(b"Username:")
        if data is None:
            data = b""
        text = _decode_text(data)
        if not text:
            return self._fail("malformed LOGIN response")
        if self._username is None:
            self._username = text  # an initial response, if any, is the user name
            return Challenge(b"Password:")
        return self._ask(self._username, text, "")


class ScramSha256Mechanism(ServerMechanism):
    """RFC 5802 / RFC 7677 SCRAM-SHA-256 without channel binding: gs2 flag "n" or "y", "p=" refused."""

    name = "SCRAM-SHA-256"

    # A per-process key makes the fake salt of an unknown user stable, so salts do not reveal which
    # user names exist (RFC 5802 §9).
    _FAKE_SALT_KEY = os.urandom(32)

    def __init__(self, *, server_nonce: str | None = None) -> None:
        super().__init__()
        if server_nonce is not None and not _is_printable_nonce(server_nonce):
            raise ValueError("server nonce must be printable ASCII without ','")
        self._server_nonce = server_nonce or secrets.token_urlsafe(24)
        self._stage = "first"
        self._gs2_header = ""
        self._client_first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._username = ""
        self._authzid = ""
        self._credentials: ScramCredentials | None = None
        self._known_user = False

    def _step(self, data: bytes | None) -> Outcome:
        if self._stage == "first":
            if data is None:
                self._stage = "first-after-challenge"
                return Challenge(b"")  # RFC 5802 §5: the client speaks first
            return self._client_first(data)
        if self._stage == "first-after-challenge":
            return self._client_first(data or b"")
        if self._stage == "final":
            return self._client_final(data or b"")
        return self._fail("unexpected client response")

    def _client_first(self, data: bytes) -> Outcome:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._fail("client-first-message is not UTF-8")
        fields = text.split(",")
        if len(fields) < 4:
            return self._fail("malformed client-first-message")
        cbind, authz_field = fields[0], fields[1]
        # RFC 5802 §7 gs2-cbind-flag: "p=" needs channel binding, which is not offered
        if cbind.startswith("p="):
            return self._fail("channel binding not supported")
        if cbind not in ("n", "y"):
            return self._fail("malformed gs2 header")
        authzid = ""
        if authz_field:
            if not authz_field.startswith("a="):
                return self._fail("malformed gs2 header")
            decoded = _unescape_saslname(authz_field[2:])
            if not decoded:
                return self._fail("malformed authzid")
            authzid = decoded
        bare = fields[2:]
        if bare[0].startswith("m="):  # RFC 5802 §5.1: mandatory extensions are unknown to us
            return self._fail("unsupported mandatory extension")
        if not bare[0].startswith("n=") or not bare[1].startswith("r="):
            return self._fail("malformed client-first-message")
        username = _unescape_saslname(bare[0][2:])
        client_nonce = bare[1][2:]
        if not username or "\x00" in username or not _is_printable_nonce(client_nonce):
            return self._fail("malformed client-first-message")
        if authzid and authzid != username:
            return self._fail("authorization identity not permitted")
        self._gs2_header = f"{cbind},{authz_field},"
        self._client_first_bare = ",".join(bare)
        self._nonce = client_nonce + self._server_nonce
        self._username = username
        self._authzid = authzid
        self._stage = "credentials"
        return NeedScramCredentials(username)

    def scram_credentials(self, credentials: ScramCredentials | None) -> Outcome:
        if self._stage != "credentials" or self._finished:
            raise RuntimeError("SCRAM-SHA-256 did not ask for credentials")
        self._known_user = credentials is not None
        if credentials is None:  # RFC 5802 §9: answer as if the user existed, then fail
            credentials = ScramCredentials(
                salt=_hmac(self._FAKE_SALT_KEY, self._username.encode("utf-8"))[:16],
                iterations=SCRAM_MIN_ITERATIONS,
                stored_key=os.urandom(32),
                server_key=os.urandom(32),
            )
        self._credentials = credentials
        salt = base64.b64encode(credentials.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={credentials.iterations}"  # RFC 5802 §5.1
        self._stage = "final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, data: bytes) -> Outcome:
        credentials = self._credentials
        assert credentials is not None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return self._fail("client-final-message is not ASCII")
        without_proof, sep, proof_field = text.rpartition(",")
        fields = without_proof.split(",")
        if not sep or len(fields) < 2 or not proof_field.startswith("p="):
            return self._fail("malformed client-final-message")
        channel_binding = _b64decode(fields[0][2:]) if fields[0].startswith("c=") else None
        # RFC 5802 §5.1: without channel binding, c= carries exactly the gs2 header
        if channel_binding != self._gs2_header.encode("utf-8"):
            return self._fail("channel binding mismatch")
        if not hmac.compare_digest(fields[1].encode("ascii"), f"r={self._nonce}".encode("ascii")):
            return self._fail("nonce mismatch")
        proof = _b64decode(proof_field[2:])
        if proof is None or len(proof) != 32:
            return self._fail("malformed proof")
        # RFC 5802 §3: AuthMessage, ClientSignature, ClientKey = ClientProof XOR ClientSignature
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        client_signature = _hmac(credentials.stored_key, auth_bytes)
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(_h(client_key), credentials.stored_key) or not self._known_user:
            return self._fail("invalid proof")  # RFC 5802 §7 server-error "invalid-proof"
        server_signature = _hmac(credentials.server_key, auth_bytes)
        verifier = b"v=" + base64.b64encode(server_signature)
        return self._succeed(self._username, self._authzid, verifier)


def server_mechanism(name: str, *, server_nonce: str | None = None) -> ServerMechanism | None:
    """A fresh server machine for mechanism ``name`` (case-insensitive), or None if unsupported.

    ``server_nonce`` fixes SCRAM's server nonce (tests only); it defaults to 24 random bytes.
    """
    match name.upper():
        case "PLAIN":
            return PlainMechanism()
        case "LOGIN":
            return LoginMechanism()
        case "SCRAM-SHA-256":
            return ScramSha256Mechanism(server_nonce=server_nonce)
        case _:
            return None


class ServerExchange:
    """One AUTHENTICATE / AUTH exchange as every protocol runs it (RFC 4422 §3, §5), over a mechanism:
    the client's (decoded) responses in, outcomes out. IMAP, SMTP and POP3 cannot carry additional
    data with their success reply, so a ``Success`` with additional data (the SCRAM server signature)
    comes out as a last ``Challenge``, and the client's answer to it must be empty (RFC 9051 §6.2.2,
    RFC 4954 §4, RFC 5034 §4); the caller never sees ``Success.additional``. ManageSieve carries it
    in its OK (RFC 5804 §2.1): with ``success_data`` the ``Success`` keeps it.
    """

    def __init__(self, mechanism: ServerMechanism, success_data: bool = False) -> None:
        self.mechanism = mechanism
        self.success_data = success_data
        self._final: Success | None = None  # sent as a last challenge, awaiting the empty answer

    @classmethod
    def for_name(cls, name: str, offered: tuple[str, ...] = MECHANISMS,
                 success_data: bool = False) -> ServerExchange | None:
        """An exchange for mechanism ``name`` if it is among ``offered`` and supported, else None."""
        if name.upper() not in (m.upper() for m in offered):
            return None
        mechanism = server_mechanism(name)
        return cls(mechanism, success_data) if mechanism is not None else None

    @property
    def name(self) -> str:
        return self.mechanism.name

    def start(self, initial: bytes | None) -> Outcome:
        """The first step, with the initial response (RFC 4959 SASL-IR) or None."""
        return self._out(self.mechanism.step(initial))

    def respond(self, data: bytes) -> Outcome:
        """The client's (base64-decoded) answer to the last challenge."""
        final, self._final = self._final, None
        if final is not None:
            return final if not data else Failure("data after the server's final message")
        return self._out(self.mechanism.step(data))

    def password_result(self, ok: bool) -> Outcome:
        return self._out(self.mechanism.password_result(ok))

    def scram_credentials(self, credentials: ScramCredentials | None) -> Outcome:
        return self._out(self.mechanism.scram_credentials(credentials))

    def _out(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome, Success) and outcome.additional is not None and not self.success_data:
            self._final = Success(outcome.authcid, outcome.authzid)
            return Challenge(outcome.additional)
        return outcome


def decode_response(line: bytes) -> bytes | None:
    """A client's base64 SASL response line (RFC 4422 §5), or None when it is not valid base64.
    An empty line is an empty response; the cancel line "*" is the protocol's to handle."""
    if not line:
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


class ScramClient:
    """Client side of SCRAM-SHA-256 (RFC 5802 §5), for tests and interop checks.

    Methods raise ValueError on malformed or dishonest server messages.
    """

    def __init__(self, username: str, password: str, *, authzid: str = "", nonce: str | None = None) -> None:
        if nonce is not None and not _is_printable_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._password = password
        self._nonce = nonce or secrets.token_urlsafe(18)
        authz = f"a={_escape_saslname(authzid)}" if authzid else ""
        self._gs2_header = f"n,{authz},"
        self._client_first_bare = f"n={_escape_saslname(username)},r={self._nonce}"
        self._server_signature: bytes | None = None

    def first_message(self) -> bytes:
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode("ascii")
        attrs = dict(f.split("=", 1) for f in text.split(",") if "=" in f)
        nonce, salt = attrs.get("r", ""), _b64decode(attrs.get("s", ""))
        if not nonce.startswith(self._nonce) or nonce == self._nonce or salt is None:
            raise ValueError("bad server-first-message")
        iterations = int(attrs.get("i", "0"))
        if not SCRAM_MIN_ITERATIONS <= iterations <= SCRAM_MAX_ITERATIONS:
            raise ValueError("unacceptable iteration count")
        salted = _salted_password(self._password, salt, iterations, query=True)
        client_key = _hmac(salted, b"Client Key")
        channel_binding = base64.b64encode(self._gs2_header.encode("utf-8")).decode("ascii")
        without_proof = f"c={channel_binding},r={nonce}"
        auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        signature = _hmac(_h(client_key), auth_message)
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={proof.decode('ascii')}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> bool:
        if self._server_signature is None:
            raise ValueError("final_message() first")
        expected = b"v=" + base64.b64encode(self._server_signature)
        return hmac.compare_digest(server_final, expected)
