"""The application's half of a SASL exchange (RFC 4422), shared by the SMTP, IMAP, POP3 and ManageSieve drivers.

`proto.sasl.ServerExchange` runs the mechanism and asks for what only the application knows: a
password check (PLAIN, LOGIN) or a user's stored SCRAM-SHA-256 keys. `settle()` answers those asks
from the accounts database (argon2 and SQLite in worker threads) until the exchange needs the client
again or is over. Throttling and the protocol's replies stay with each driver.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from ..message.types import User
from ..proto import sasl

__all__ = ["AccountLookup", "Settled", "settle"]


class AccountLookup(Protocol):
    """What `settle()` needs of the accounts database."""

    async def verify_password_async(self, address: str, password: str) -> User | None: ...
    def scram_credentials(self, address: str) -> sasl.ScramCredentials | None: ...
    def get_user(self, address: str) -> User | None: ...


@dataclass(frozen=True, slots=True)
class Settled:
    """Where the exchange stands: a challenge for the client, or the end. On success `user` is the
    authenticated account (None when it was removed meanwhile: treat as a failure)."""

    outcome: sasl.Challenge | sasl.Success | sasl.Failure
    user: User | None = None


async def settle(exchange: sasl.ServerExchange, outcome: sasl.Outcome, accounts: AccountLookup) -> Settled:
    """Answer the exchange's password checks and credential lookups, starting from `outcome`."""
    user: User | None = None
    for _ in range(4):  # a mechanism asks at most a lookup and a check per client message
        if isinstance(outcome, sasl.NeedPasswordCheck):
            user = None
            # RFC 4616 §2: an authzid other than the authcid itself is refused (no proxy logins)
            if not outcome.authzid or outcome.authzid.lower() == outcome.authcid.lower():
                user = await accounts.verify_password_async(outcome.authcid, outcome.password)
            outcome = exchange.password_result(user is not None)
        elif isinstance(outcome, sasl.NeedScramCredentials):
            creds = await asyncio.to_thread(accounts.scram_credentials, outcome.username)
            outcome = exchange.scram_credentials(creds)
        else:
            break
    if isinstance(outcome, sasl.Success):
        if user is None:  # SCRAM: the keys matched; the account is looked up now
            user = await asyncio.to_thread(accounts.get_user, outcome.authcid)
        return Settled(outcome, user)
    if isinstance(outcome, sasl.Challenge | sasl.Failure):
        return Settled(outcome)
    return Settled(sasl.Failure("the mechanism kept asking"))
