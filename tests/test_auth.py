"""proxy.auth: API keys, JWT verification (and its classic attacks), tool allow-lists."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy import auth
from proxy.auth import (
    TOOL_NOT_ALLOWED,
    AuthFailure,
    Identity,
    JwksCache,
    JwtVerifier,
    KeyTable,
    authenticate,
    check_access,
    check_tool_allowed,
    generate_api_key,
    hash_api_key,
    parse_api_key,
    strip_credentials,
)

NOW = 1_800_000_000.0
SECRET = b"a-shared-secret-of-at-least-32-bytes!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(public: Any, algorithm: Callable[[Any], str], kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(algorithm(public))
    return jwk | {"kid": kid, "use": "sig"}


RSA_JWK = _jwk(RSA_KEY.public_key(), RSAAlgorithm.to_jwk, "rsa-1")
EC_JWK = _jwk(EC_KEY.public_key(), ECAlgorithm.to_jwk, "ec-1")


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "tenant": "acme", "exp": NOW + 60, "aud": "sb", "iss": "idp"} | extra


def verifier(*algs: str, **kw: Any) -> JwtVerifier:
    jwks = JwksCache({"keys": [RSA_JWK, EC_JWK]}, NOW)
    hs = SECRET if any(a.startswith("HS") for a in algs) else None
    options: dict[str, Any] = {"audience": "sb", "issuer": "idp"} | kw
    return JwtVerifier(algorithms=frozenset(algs), hs_secret=hs, jwks=jwks, **options)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"authorization", b"Bearer " + token.encode())]


def check(token: str, v: JwtVerifier, now: float = NOW) -> Identity | AuthFailure:
    return authenticate(bearer(token), KeyTable(), v, now=now)


def failure(result: Identity | AuthFailure, description: str) -> None:
    assert isinstance(result, AuthFailure), result
    assert result.status == 401
    assert result.description == description
    assert result.headers() == [
        (
            b"www-authenticate",
            b'Bearer realm="switchboard", error="invalid_token", '
            b'error_description="' + description.encode() + b'"',
        )
    ]


def test_importing_auth_stays_sans_io() -> None:
    code = "import sys, proxy.auth, proxy.ratelimit; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.replace("'", '"')))
    assert not loaded & {"trio", "socket", "ssl", "asyncio", "jwt", "redis"}


# -- JWT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [("HS256", SECRET, None), ("RS256", RSA_KEY, "rsa-1"), ("ES256", EC_KEY, "ec-1")],
)
def test_valid_jwt(alg: str, key: Any, kid: str | None) -> None:
    token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid} if kid else None)
    identity = check(token, verifier("HS256", "RS256", "ES256"))
    assert identity == Identity("jwt", "alice", "acme", scopes=frozenset())


@pytest.mark.parametrize(
    ("extra", "scopes", "client_id"),
    [
        ({"scope": "read  write", "client_id": "app-1"}, {"read", "write"}, "app-1"),
        ({"scp": ["read", 7], "azp": "app-2"}, {"read"}, "app-2"),
        ({"scope": 5, "client_id": ["x"]}, set(), None),
    ],
)
def test_jwt_scopes_and_client(
    extra: dict[str, Any], scopes: set[str], client_id: str | None
) -> None:
    token = jwt.encode(claims(**extra), SECRET, algorithm="HS256")
    identity = check(token, verifier("HS256"))
    assert isinstance(identity, Identity)
    assert (identity.scopes, identity.client_id) == (frozenset(scopes), client_id)


def test_an_oauth_resource_replaces_the_audience_and_issuer_rules() -> None:
    v = verifier("HS256")
    token = jwt.encode(claims(aud="https://mcp.example/mcp", iss="https://as.example"), SECRET)
    assert isinstance(v.verify(token, NOW), AuthFailure)  # not the configured audience
    ok = v.verify(token, NOW, audience="https://mcp.example/mcp", issuers=["https://as.example"])
    assert isinstance(ok, Identity)
    for audience, issuers in (
        ("https://other.example/mcp", ["https://as.example"]),
        ("https://mcp.example/mcp", ["https://elsewhere.example"]),
    ):
        refused = v.verify(token, NOW, audience=audience, issuers=issuers)
        assert isinstance(refused, AuthFailure) and refused.status == 401


def _forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    return signing_input + "." + b64(hmac.digest(key, signing_input.encode(), "sha256"))


def test_alg_none_rejected() -> None:
    token = _forge({"alg": "none", "typ": "JWT"}, claims(), None)
    failure(check(token, verifier("HS256", "RS256")), "algorithm not allowed")
    with pytest.raises(ValueError):
        JwtVerifier(algorithms=frozenset({"none"}), hs_secret=SECRET)


def test_algorithm_confusion_rejected() -> None:
    """An HS256 token keyed with the RSA public key PEM: the classic confusion attack."""
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for header in ({"alg": "HS256", "kid": "rsa-1"}, {"alg": "HS256"}):
        token = _forge(header, claims(), pem)
        failure(check(token, verifier("RS256")), "algorithm not allowed")
    # Even where HS256 is allowed, it is checked only against the shared secret.
    failure(check(_forge({"alg": "HS256"}, claims(), pem), verifier("HS256", "RS256")),
            "invalid signature")  # fmt: skip


def test_key_type_must_fit_algorithm() -> None:
    token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-1"})
    failure(check(token, verifier("RS256", "ES256")), "key does not fit the algorithm")


@pytest.mark.parametrize(
    ("extra", "now", "description"),
    [
        ({"exp": NOW - 1}, NOW, "token expired"),
        ({}, NOW + 60, "token expired"),
        ({"nbf": NOW + 30}, NOW, "token not yet valid"),
        ({"aud": "other"}, NOW, "invalid audience"),
        ({"iss": "evil"}, NOW, "invalid issuer"),
        ({"exp": None}, NOW, "missing claim exp"),
        ({"exp": "soon"}, NOW, "malformed token"),
    ],
)
def test_jwt_claims_checked(extra: dict[str, Any], now: float, description: str) -> None:
    payload = {k: v for k, v in claims(**extra).items() if v is not None}
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    failure(check(token, verifier("HS256"), now), description)


def test_leeway() -> None:
    token = jwt.encode(claims(exp=NOW - 5, nbf=NOW + 5), SECRET, algorithm="HS256")
    assert isinstance(check(token, verifier("HS256", leeway=10)), Identity)


def test_bad_signature_and_garbage() -> None:
    token = jwt.encode(claims(), b"another-secret-of-at-least-32-bytes!", algorithm="HS256")
    failure(check(token, verifier("HS256")), "invalid signature")
    failure(check("a.b.c", verifier("HS256")), "malformed token")


def test_unknown_kid_and_rotation() -> None:
    cache = JwksCache({"keys": [RSA_JWK]}, NOW, max_age=3600, min_refresh=60)
    v = JwtVerifier(algorithms=frozenset({"RS256"}), jwks=cache, audience="sb", issuer="idp")
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "rsa-2"})
    assert not cache.needs_refresh(NOW)
    failure(check(token, v), "unknown key id")
    assert not cache.needs_refresh(NOW + 59)  # no fetch storm from forged kids
    assert cache.needs_refresh(NOW + 60)
    cache.update({"keys": [_jwk(new_key.public_key(), RSAAlgorithm.to_jwk, "rsa-2")]}, NOW + 60)
    assert isinstance(check(token, v), Identity)
    old = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    failure(check(old, v), "unknown key id")  # rotated out
    assert cache.needs_refresh(NOW + 60 + 3600)


def test_jwks_skips_unusable_keys() -> None:
    oct_key = {"kty": "oct", "kid": "s", "k": "c2VjcmV0"}
    cache = JwksCache({"keys": [oct_key, {"kty": "RSA", "kid": "bad"}, RSA_JWK, "x"]}, NOW)
    assert set(cache.keys) == {"rsa-1"}
    # A single key serves tokens without a kid.
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    v = JwtVerifier(algorithms=frozenset({"RS256"}), jwks=cache, audience="sb", issuer="idp")
    assert isinstance(check(token, v), Identity)


def test_verifier_configuration_errors() -> None:
    with pytest.raises(ValueError):
        JwtVerifier(algorithms=frozenset({"HS256"}))
    with pytest.raises(ValueError):
        JwtVerifier(algorithms=frozenset({"RS256"}))
    with pytest.raises(ValueError):
        JwtVerifier(algorithms=frozenset())


# -- API keys -------------------------------------------------------------------------


def _table() -> tuple[str, KeyTable]:
    key, prefix, digest = generate_api_key()
    identity = Identity("key", "svc", "acme", prefix, frozenset({"search"}))
    return key, KeyTable([(prefix, digest, identity)])


def test_generated_key_shape() -> None:
    key, prefix, digest = generate_api_key()
    assert key.startswith(f"sb_{prefix}_") and len(prefix) == 8
    assert parse_api_key(key) == prefix
    assert digest == hashlib.sha256(key.encode()).hexdigest() == hash_api_key(key)
    assert generate_api_key()[0] != key


def test_api_key_valid() -> None:
    key, table = _table()
    identity = authenticate(bearer(key), table, None, now=NOW)
    assert isinstance(identity, Identity) and identity.subject == "svc"
    # A configured header carries the bare key.
    headers = [(b"x-api-key", key.encode())]
    assert authenticate(headers, table, None, now=NOW, header_name=b"x-api-key") == identity


@pytest.mark.parametrize(
    ("mutate", "description"),
    [
        (lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"), "unknown or revoked API key"),
        (lambda k: "sb_zzzzzzzz_" + k[12:], "unknown or revoked API key"),
        (lambda k: k[:11], "malformed API key"),
        (lambda k: k.replace("sb_", "sb_X", 1), "malformed API key"),
        (lambda k: k + "!", "malformed API key"),
        (lambda k: k + "a" * 300, "malformed API key"),
        (lambda k: "nope", "malformed credentials"),
    ],
)
def test_api_key_invalid(mutate: Callable[[str], str], description: str) -> None:
    key, table = _table()
    failure(authenticate(bearer(mutate(key)), table, None, now=NOW), description)


def test_revoked_key_is_absent_from_the_snapshot() -> None:
    key, _ = _table()
    failure(authenticate(bearer(key), KeyTable(), None, now=NOW), "unknown or revoked API key")


def test_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module proxy.auth calls
    key, table = _table()
    assert isinstance(authenticate(bearer(key), table, None, now=NOW), Identity)
    authenticate(bearer("sb_00000000_x"), table, None, now=NOW)  # unknown prefix compares too
    assert len(calls) == 2


def test_missing_or_odd_credentials() -> None:
    _, table = _table()
    result = authenticate([(b"host", b"x")], table, None, now=NOW)
    assert isinstance(result, AuthFailure) and result.status == 401
    assert result.www_authenticate == b'Bearer realm="switchboard"'
    for headers in (
        [(b"authorization", b"Basic dXNlcjpwYXNz")],
        [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
        [(b"authorization", b"Bearer ")],
    ):
        result = authenticate(headers, table, None, now=NOW)
        assert isinstance(result, AuthFailure) and b'error="invalid_request"' in (
            result.www_authenticate
        )
    failure(authenticate([(b"authorization", b"Bearer \xff")], table, None, now=NOW),
            "malformed credentials")  # fmt: skip


# -- authorization --------------------------------------------------------------------


def test_tool_allow_list() -> None:
    limited = Identity("key", "svc", "acme", "abcd1234", frozenset({"search"}))
    assert check_tool_allowed(limited, "search") is None
    denied = check_tool_allowed(limited, "delete_everything")
    assert denied is not None and denied.code == TOOL_NOT_ALLOWED
    body = msgspec.json.decode(denied.body(7))
    assert body == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32003, "message": "Tool not allowed: delete_everything"},
    }
    assert check_tool_allowed(limited, None) is not None
    assert check_tool_allowed(Identity("jwt", "bob"), "anything") is None
    assert check_tool_allowed(Identity("jwt", "bob", allowed_tools=frozenset()), "x") is not None


def test_route_access_is_403() -> None:
    identity = Identity("jwt", "bob", "acme")
    assert check_access(identity, None) is None
    assert check_access(identity, frozenset({"acme"})) is None
    refused = check_access(identity, frozenset({"other"}))
    assert refused is not None and refused.status == 403
    assert b'error="insufficient_scope"' in refused.www_authenticate


def test_strip_credentials() -> None:
    headers = [(b"host", b"x"), (b"authorization", b"Bearer t"), (b"x-api-key", b"k")]
    assert strip_credentials(headers, forward=True) == headers
    assert strip_credentials(headers, forward=False) == [(b"host", b"x"), (b"x-api-key", b"k")]
    assert strip_credentials(headers, False, b"x-api-key") == [(b"host", b"x")]


def test_challenge_cannot_be_broken_out_of() -> None:
    failure_ = auth.unauthorized('bad "quote" \\ \r\n')
    assert failure_.www_authenticate.endswith(b'error_description="bad quote  "')
