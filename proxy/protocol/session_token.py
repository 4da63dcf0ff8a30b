"""Stateless session affinity: the Mcp-Session-Id the proxy hands out carries its route.

A token names the backend replica, the backend's own session id and when it was issued,
and is authenticated with HMAC-SHA256 under a key chosen by key id, so any worker on any
host can route it with no lookup, and a client can neither forge nor alter one:

    v1.<kid>.<base64url(payload)>.<base64url(mac)>      (no padding)
    payload = issued_at (uint64 BE) | len(replica) (uint8) | replica | backend session
    mac     = HMAC-SHA256(keyring[kid], b"v1.<kid>.<base64url(payload)>")

The MAC covers the text before it, version and kid included, and is compared in text
form with hmac.compare_digest, so every character of a token is authenticated; there is
no second, non-canonical spelling of a valid token. Everything is visible ASCII, as the
spec requires of session ids (0x21-0x7E, 2025-11-25 transports "Session Management").

Not encrypted: the backend session id is what the backend would have shown the client
anyway. The replica is visible too; give replicas opaque ids if their names are private.

Rotation: the keyring maps kid -> secret; `current` signs, every kid verifies. Add the
new key, then make it current once every worker has it, then drop the old one after the
longest session you want to keep. Any failure is InvalidSessionToken, which the proxy
answers with 404 (the spec's answer for an unknown or expired session).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

TOKEN_VERSION: Final = "v1"
MAX_TOKEN_LENGTH: Final = 3072
MIN_KEY_BYTES: Final = 32
MAX_REPLICA_BYTES: Final = 64
MAX_BACKEND_SESSION_BYTES: Final = 512
"""Room for any real session id (UUIDs, JWTs); with the caps above a token stays < 850."""
TRANSLATED: Final = "-"
"""The replica of a session that lives at the proxy (era translation,
``proxy.protocol.era_translation``): no replica holds it, and the backend session field
carries the client's state instead (no replica id is ever "-")."""
MAX_TRANSLATED_STATE_BYTES: Final = 2048
"""The client state a translated session carries; the token then stays < 2,850."""

_KID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]+")
_PREFIX = struct.Struct(">QB")  # issued_at, replica length


class InvalidSessionToken(Exception):
    """Not a token this proxy issued, or no longer valid; answer 404."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SessionClaims:
    replica: str
    backend_session: str
    issued_at: int
    """Unix seconds."""
    kid: str
    """The key that signed it: tells how many sessions still ride on an old key."""


class Keyring:
    """Secrets by key id. `current` signs new tokens; every key verifies."""

    __slots__ = ("_secrets", "current")

    def __init__(self, secrets: Mapping[str, bytes], current: str) -> None:
        for kid, secret in secrets.items():
            if _KID.fullmatch(kid) is None:
                raise ValueError(f"key id {kid!r}: 1-16 characters of A-Z a-z 0-9 _ -")
            if len(secret) < MIN_KEY_BYTES:
                raise ValueError(f"key {kid!r} is shorter than {MIN_KEY_BYTES} bytes")
        if current not in secrets:
            raise ValueError(f"current key id {current!r} is not in the keyring")
        self._secrets = dict(secrets)
        self.current = current

    def secret(self, kid: str) -> bytes | None:
        return self._secrets.get(kid)

    def __repr__(self) -> str:
        return f"Keyring(kids={sorted(self._secrets)}, current={self.current!r})"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed: str) -> str:
    return _b64(hmac.digest(secret, signed.encode("ascii"), "sha256"))


class SessionTokens:
    """Issues and verifies session tokens under one keyring.

    `max_age` (seconds) bounds how old a token may be; None lets tokens live as long as
    the backend session does. `max_skew` tolerates issuers whose clocks run ahead.
    `clock` is injectable so tests need no sleeping.
    """

    __slots__ = ("_clock", "keyring", "max_age", "max_skew")

    def __init__(
        self,
        keyring: Keyring,
        *,
        max_age: float | None = None,
        max_skew: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.max_age = max_age
        self.max_skew = max_skew
        self._clock = clock

    def issue(self, replica: str, backend_session: str) -> str:
        """A token for `backend_session` on `replica`, signed with the current key."""
        replica_bytes = replica.encode("utf-8")
        session_bytes = backend_session.encode("utf-8")
        if len(replica_bytes) > MAX_REPLICA_BYTES:
            raise ValueError(f"replica id longer than {MAX_REPLICA_BYTES} bytes")
        limit = MAX_TRANSLATED_STATE_BYTES if replica == TRANSLATED else MAX_BACKEND_SESSION_BYTES
        if len(session_bytes) > limit:
            raise ValueError(f"backend session id longer than {limit} bytes")
        issued_at = max(0, int(self._clock()))
        payload = _PREFIX.pack(issued_at, len(replica_bytes)) + replica_bytes + session_bytes
        kid = self.keyring.current
        secret = self.keyring.secret(kid)
        assert secret is not None  # Keyring guarantees the current kid has a secret
        signed = f"{TOKEN_VERSION}.{kid}.{_b64(payload)}"
        return f"{signed}.{_mac(secret, signed)}"

    def verify(self, token: str) -> SessionClaims:
        """The claims of a token this keyring issued; InvalidSessionToken otherwise."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidSessionToken("too long")
        if _TOKEN.fullmatch(token) is None:
            raise InvalidSessionToken("malformed")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != TOKEN_VERSION:
            raise InvalidSessionToken("malformed")
        _, kid, payload_text, mac_text = parts
        secret = self.keyring.secret(kid)
        if secret is None:
            raise InvalidSessionToken("unknown key id")
        signed = token[: len(token) - len(mac_text) - 1]
        if not hmac.compare_digest(_mac(secret, signed), mac_text):
            raise InvalidSessionToken("bad signature")
        claims = _parse_payload(payload_text, kid)
        if self.max_age is not None:
            age = self._clock() - claims.issued_at
            if age > self.max_age:
                raise InvalidSessionToken("expired")
            if age < -self.max_skew:
                raise InvalidSessionToken("issued in the future")
        return claims


def _parse_payload(text: str, kid: str) -> SessionClaims:
    # Only reached with a valid MAC, so a failure here means a bug or a leaked key.
    try:
        payload = _unb64(text)
        issued_at, replica_length = _PREFIX.unpack_from(payload)
        start = _PREFIX.size
        if len(payload) < start + replica_length:
            raise ValueError("truncated replica")
        replica = payload[start : start + replica_length].decode("utf-8")
        session = payload[start + replica_length :].decode("utf-8")
    except (binascii.Error, struct.error, ValueError):
        raise InvalidSessionToken("malformed payload") from None
    return SessionClaims(replica, session, issued_at, kid)
