"""Session affinity tokens (proxy.protocol.session_token): HMAC, rotation, limits."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.session_token import (
    MAX_BACKEND_SESSION_BYTES,
    MAX_REPLICA_BYTES,
    MAX_TOKEN_LENGTH,
    InvalidSessionToken,
    Keyring,
    SessionClaims,
    SessionTokens,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 148))
NOW = 1_760_000_000.0
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def codec(
    keys: dict[str, bytes] | None = None,
    current: str = "a",
    *,
    clock: Clock | None = None,
    max_age: float | None = None,
) -> SessionTokens:
    keyring = Keyring(keys or {"a": KEY_A}, current)
    return SessionTokens(keyring, clock=clock or Clock(), max_age=max_age)


def invalid(tokens: SessionTokens, token: str) -> str:
    with pytest.raises(InvalidSessionToken) as info:
        tokens.verify(token)
    return info.value.reason


def test_round_trip() -> None:
    tokens = codec()
    token = tokens.issue("replica-2", "9f86d081884c7d659a2feaa0c55ad015")
    assert tokens.verify(token) == SessionClaims(
        "replica-2", "9f86d081884c7d659a2feaa0c55ad015", int(NOW), "a"
    )


def test_format_is_versioned_and_visible_ascii() -> None:
    token = codec().issue("r", "s")
    assert VISIBLE_ASCII.fullmatch(token)
    version, kid, _payload, mac = token.split(".")
    assert (version, kid) == ("v1", "a")
    assert len(mac) == 43  # 32 bytes of HMAC-SHA256, base64url without padding
    assert "=" not in token


def test_every_token_differs_in_its_session() -> None:
    tokens = codec()
    assert tokens.issue("r", "s1") != tokens.issue("r", "s2")
    assert tokens.issue("r1", "s") != tokens.issue("r2", "s")


def test_tampering_with_any_character_invalidates() -> None:
    tokens = codec()
    token = tokens.issue("replica-1", "session-abc")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for index, original in enumerate(token):
        for replacement in {alphabet[(alphabet.index(original) + 1) % len(alphabet)], "A", "."}:
            if replacement == original:
                continue
            tampered = token[:index] + replacement + token[index + 1 :]
            with pytest.raises(InvalidSessionToken):
                tokens.verify(tampered)


def test_truncation_and_extension_invalidate() -> None:
    tokens = codec()
    token = tokens.issue("r", "s")
    for cut in range(len(token)):
        with pytest.raises(InvalidSessionToken):
            tokens.verify(token[:cut])
    for suffix in ("A", ".", ".x", "=="):
        with pytest.raises(InvalidSessionToken):
            tokens.verify(token + suffix)


def test_swapping_payloads_between_tokens_invalidates() -> None:
    tokens = codec()
    mine = tokens.issue("r1", "mine").split(".")
    theirs = tokens.issue("r1", "theirs").split(".")
    forged = ".".join([mine[0], mine[1], theirs[2], mine[3]])
    assert invalid(tokens, forged) == "bad signature"


def test_wrong_key_is_rejected() -> None:
    token = codec({"a": KEY_A}).issue("r", "s")
    assert invalid(codec({"a": KEY_B}), token) == "bad signature"


def test_unknown_kid_is_rejected() -> None:
    token = codec({"old": KEY_A}, "old").issue("r", "s")
    assert invalid(codec({"new": KEY_B}, "new"), token) == "unknown key id"


def test_rotated_key_still_verifies_and_new_tokens_use_the_current_key() -> None:
    old = codec({"k1": KEY_A}, "k1")
    old_token = old.issue("r", "s")
    rotated = codec({"k1": KEY_A, "k2": KEY_B}, "k2")
    assert rotated.verify(old_token).kid == "k1"
    new_token = rotated.issue("r", "s")
    assert new_token.split(".")[1] == "k2"
    assert rotated.verify(new_token).kid == "k2"
    # Once k1 is dropped, its tokens are gone.
    assert invalid(codec({"k2": KEY_B}, "k2"), old_token) == "unknown key id"


def test_kid_swap_is_caught_by_the_mac() -> None:
    both = codec({"k1": KEY_A, "k2": KEY_B}, "k1")
    token = both.issue("r", "s")
    assert invalid(both, token.replace("v1.k1.", "v1.k2.", 1)) == "bad signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1.a.AAAA",
        "v2.a.AAAA.BBBB",
        "v1.a.AAAA.BBBB.CCCC",
        "v1..AAAA.BBBB",
        "v1.a.AA AA.BBBB",
        "v1.a.AAAA.BB+B",
        "v1.a.AAAA.BB/B",
        "v1.a.\u00e9AAA.BBBB",
        "v1.a.AAAA.BBBB\n",
        "\x00",
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert invalid(codec(), token) in {"malformed", "unknown key id", "bad signature"}


def test_overlong_token_is_rejected_before_any_work() -> None:
    assert invalid(codec(), "v1.a." + "A" * MAX_TOKEN_LENGTH + ".B") == "too long"


def test_largest_token_fits_under_the_cap() -> None:
    keyring_kid = "k" * 16
    tokens = codec({keyring_kid: KEY_A}, keyring_kid)
    token = tokens.issue("r" * MAX_REPLICA_BYTES, "s" * MAX_BACKEND_SESSION_BYTES)
    assert len(token) <= MAX_TOKEN_LENGTH
    assert tokens.verify(token).backend_session == "s" * MAX_BACKEND_SESSION_BYTES


def test_issue_refuses_oversized_ids() -> None:
    tokens = codec()
    with pytest.raises(ValueError):
        tokens.issue("r" * (MAX_REPLICA_BYTES + 1), "s")
    with pytest.raises(ValueError):
        tokens.issue("r", "s" * (MAX_BACKEND_SESSION_BYTES + 1))


def test_expiry() -> None:
    clock = Clock()
    tokens = codec(clock=clock, max_age=3600)
    token = tokens.issue("r", "s")
    clock.now = NOW + 3600
    assert tokens.verify(token).issued_at == int(NOW)
    clock.now = NOW + 3601
    assert invalid(tokens, token) == "expired"


def test_without_max_age_tokens_do_not_expire() -> None:
    clock = Clock()
    tokens = codec(clock=clock)
    token = tokens.issue("r", "s")
    clock.now = NOW + 10 * 365 * 86400
    assert tokens.verify(token).replica == "r"


def test_tokens_from_the_future_beyond_the_skew_are_rejected() -> None:
    issuer_clock = Clock(NOW + 3600)
    token = codec(clock=issuer_clock).issue("r", "s")
    assert invalid(codec(max_age=86400), token) == "issued in the future"
    slightly_ahead = codec(clock=Clock(NOW + 30)).issue("r", "s")
    assert codec(max_age=86400).verify(slightly_ahead).replica == "r"


@pytest.mark.parametrize(
    ("keys", "current"),
    [
        ({"a": b"x" * 31}, "a"),
        ({"a": b""}, "a"),
        ({"a": KEY_A}, "b"),
        ({"a.b": KEY_A}, "a.b"),
        ({"": KEY_A}, ""),
        ({"k" * 17: KEY_A}, "k" * 17),
        ({"a": KEY_A, "b": b"short"}, "a"),
    ],
)
def test_keyring_validation(keys: dict[str, bytes], current: str) -> None:
    with pytest.raises(ValueError):
        Keyring(keys, current)


def test_keyring_repr_shows_no_secrets() -> None:
    text = repr(Keyring({"a": KEY_A}, "a"))
    assert "a" in text and KEY_A.hex() not in text and repr(KEY_A) not in text


@given(
    replica=st.text(max_size=20).filter(lambda s: len(s.encode()) <= MAX_REPLICA_BYTES),
    backend_session=st.text(max_size=300).filter(
        lambda s: len(s.encode()) <= MAX_BACKEND_SESSION_BYTES
    ),
)
def test_round_trip_any_ids(replica: str, backend_session: str) -> None:
    tokens = codec()
    token = tokens.issue(replica, backend_session)
    assert VISIBLE_ASCII.fullmatch(token)
    assert len(token) <= MAX_TOKEN_LENGTH
    claims = tokens.verify(token)
    assert (claims.replica, claims.backend_session) == (replica, backend_session)


@given(
    session=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=256
    ),
    garbage=st.text(max_size=40),
)
def test_random_strings_never_verify(session: str, garbage: str) -> None:
    tokens = codec()
    token = tokens.issue("r", session)
    head = token.rsplit(".", 1)[0]
    with pytest.raises(InvalidSessionToken):
        tokens.verify(garbage)
    if garbage != token.rsplit(".", 1)[1]:
        with pytest.raises(InvalidSessionToken):
            tokens.verify(f"{head}.{garbage}")
