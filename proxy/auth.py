"""Pure authentication and per-tool authorization: API keys, JWTs, allow-lists.

No I/O: keys come from a snapshot (``KeyTable``), JWKS from a ``JwksCache`` that a
control-plane task fills from a file or URL.

* API keys look like ``sb_<8-char prefix>_<secret>``. Only the SHA-256 of the whole key is
  stored (a fast hash is enough: the secret carries 256 random bits), found by prefix and
  compared with ``hmac.compare_digest``. A revoked key is one absent from the snapshot.
* JWTs are verified with PyJWT. The accepted algorithms are the configured list, never the
  token's header; ``none`` cannot be configured; HS* is checked only against the shared
  secret and RS/PS/ES/EdDSA only against JWKS keys of the matching type, so an HS256 token
  "signed" with a public key fails (algorithm confusion). ``exp`` is required; ``exp`` and
  ``nbf`` are checked against the caller's ``now``; ``aud`` and ``iss`` by PyJWT.
* Failures are 401 with an RFC 6750 ``WWW-Authenticate`` challenge; a valid identity
  without access to a route is 403 ``insufficient_scope``.
* A ``tools/call`` outside the identity's allow-list is answered as the backend answers
  an unknown tool (``proxy.protocol.tool_lists``); one that names no tool is HTTP 200 with
  a JSON-RPC error, ``TOOL_NOT_ALLOWED`` (-32003; the reference SDK uses -32000..-32002
  and -32020..-32042).

PyJWT is imported lazily: ``import jwt`` loads urllib, socket and ssl.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.protocol.jsonrpc import RequestId, error_body
from proxy.ratelimit import Rate

Headers = Sequence[tuple[bytes, bytes]]

KEY_PREFIX: Final = "sb_"
_KEY_SHAPE: Final = re.compile(r"sb_([a-z0-9]{8})_[A-Za-z0-9_-]{1,244}")
TOOL_NOT_ALLOWED: Final = -32003
AUTH_FAILED: Final = -32001
"""The JSON-RPC error code in the body of a 401/403 on an MCP route."""
REALM: Final = b'Bearer realm="switchboard"'


def generate_api_key() -> tuple[str, str, str]:
    """A new key: (the key, shown once; its prefix; its SHA-256 hex, to store)."""
    prefix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_api_key(key)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_key(key: str) -> str | None:
    """The key's prefix, or None when it is not shaped like one of ours."""
    match = _KEY_SHAPE.fullmatch(key)
    return match[1] if match else None


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str
    """``"key"`` or ``"jwt"``."""
    subject: str
    tenant: str | None = None
    key_prefix: str | None = None
    allowed_tools: frozenset[str] | None = None
    """None: every tool; otherwise only these names in ``tools/call``."""
    limits: Mapping[str, Rate] = field(default_factory=dict)
    """Rate overrides by scope: ``"key"``, ``"tenant"``, ``"tool:<name>"``."""
    key_id: int | None = None
    tenant_id: int | None = None
    max_connections: int | None = None
    """The tenant's own concurrent-connection cap, overriding the configured default."""
    scopes: frozenset[str] | None = None
    """A JWT's scopes (``scope``, space-separated, or ``scp``); None for API keys."""
    client_id: str | None = None
    """The OAuth client a JWT was issued to (``client_id``, else ``azp``)."""


@dataclass(frozen=True, slots=True)
class AuthFailure:
    status: int
    description: str
    www_authenticate: bytes
    error: str | None = None
    """The RFC 6750 error code of the challenge (None where no credential came)."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", self.www_authenticate)]


def _challenge(error: str | None, description: str) -> bytes:
    if error is None:
        return REALM
    # A quoted-string: our descriptions are fixed ASCII, but never let one break out.
    safe = "".join(c for c in description if c.isprintable() and c not in '"\\')
    return REALM + f', error="{error}", error_description="{safe}"'.encode("ascii", "replace")


def unauthorized(description: str, error: str | None = "invalid_token") -> AuthFailure:
    return AuthFailure(401, description, _challenge(error, description), error)


def forbidden(description: str) -> AuthFailure:
    error = "insufficient_scope"
    return AuthFailure(403, description, _challenge(error, description), error)


class KeyTable:
    """API keys by prefix, from one snapshot: prefix -> (SHA-256 hex, identity)."""

    def __init__(self, records: Iterable[tuple[str, str, Identity]] = ()) -> None:
        self._keys: dict[str, tuple[bytes, Identity]] = {
            prefix: (digest.lower().encode("ascii"), identity)
            for prefix, digest, identity in records
        }

    def lookup(self, prefix: str) -> tuple[bytes, Identity] | None:
        return self._keys.get(prefix)


_DUMMY_DIGEST: Final = hash_api_key("sb_00000000_unused").encode("ascii")


def verify_api_key(key: str, table: KeyTable) -> Identity | AuthFailure:
    prefix = parse_api_key(key)
    if prefix is None:
        return unauthorized("malformed API key")
    entry = table.lookup(prefix)
    digest = hash_api_key(key).encode("ascii")
    # Compare even for an unknown prefix, so both paths take the same time.
    ok = hmac.compare_digest(digest, entry[0] if entry is not None else _DUMMY_DIGEST)
    if entry is None or not ok:
        return unauthorized("unknown or revoked API key")
    return entry[1]


def credential_of(headers: Headers, header_name: bytes) -> bytes | AuthFailure | None:
    values = [value for name, value in headers if name == header_name]
    if not values:
        return None
    if len(values) > 1:
        return unauthorized("more than one credential", "invalid_request")
    value = values[0].strip()
    if header_name == b"authorization":
        scheme, _, value = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return unauthorized("Bearer credentials expected", "invalid_request")
        value = value.strip()
    return value or unauthorized("empty credentials", "invalid_request")


def authenticate(
    headers: Headers,
    key_table: KeyTable,
    jwt_verifier: JwtVerifier | None,
    *,
    now: float,
    header_name: bytes = b"authorization",
) -> Identity | AuthFailure:
    """Who is calling: an API key, else (with a verifier) a JWT; a 401 otherwise.
    ``headers`` have lower-case names, as h11 gives them; ``now`` is Unix time."""
    credential = credential_of(headers, header_name)
    if credential is None:
        return unauthorized("credentials required", error=None)
    if isinstance(credential, AuthFailure):
        return credential
    try:
        token = credential.decode("ascii")
    except UnicodeDecodeError:
        return unauthorized("malformed credentials")
    if token.startswith(KEY_PREFIX):
        return verify_api_key(token, key_table)
    if jwt_verifier is not None and token.count(".") == 2:
        return jwt_verifier.verify(token, now)
    return unauthorized("malformed credentials")


def check_access(identity: Identity, tenants: frozenset[str] | None) -> AuthFailure | None:
    """403 when a route is limited to some tenants and the identity is not in one."""
    if tenants is None or identity.tenant in tenants:
        return None
    return forbidden("not permitted on this route")


@dataclass(frozen=True, slots=True)
class ToolDenied:
    """Answered with HTTP 200 and this JSON-RPC error; the backend never sees the call."""

    tool: str | None
    code: int = TOOL_NOT_ALLOWED

    @property
    def message(self) -> str:
        return f"Tool not allowed: {self.tool}" if self.tool else "Tool not allowed"

    def body(self, request_id: RequestId | None) -> bytes:
        return error_body(request_id, self.code, self.message)


def check_tool_allowed(identity: Identity, tool_name: str | None) -> ToolDenied | None:
    allowed = identity.allowed_tools
    if allowed is None or (tool_name is not None and tool_name in allowed):
        return None
    return ToolDenied(tool_name)


def strip_credentials(
    headers: Headers, forward: bool, header_name: bytes = b"authorization"
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the client's credentials only if the route says so."""
    if forward:
        return list(headers)
    drop = {b"authorization", header_name}
    return [(name, value) for name, value in headers if name not in drop]


# -- JWT ------------------------------------------------------------------------------

_KEY_TYPES: Final = {"RS": "RSA", "PS": "RSA", "Ed": "OKP"}
_CURVES: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", *_CURVES, "EdDSA"}
)


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether a JWK may verify ``alg``: its type (and curve) match, and its own alg."""
    if jwk.get("alg") not in (None, alg):
        return False
    if alg in _CURVES:
        return jwk.get("kty") == "EC" and jwk.get("crv") == _CURVES[alg]
    kty = _KEY_TYPES.get(alg[:2])
    return kty is not None and jwk.get("kty") == kty


class JwksCache:
    """Public keys by ``kid`` from a JWKS document, with when to fetch it again.

    The caller fetches (file or URL) when ``needs_refresh(now)`` and calls ``update``.
    An unknown ``kid`` asks for an early refresh (keys rotate), at most once per
    ``min_refresh`` seconds so forged kids cannot turn into a fetch storm."""

    def __init__(
        self, jwks: Mapping[str, Any], now: float, max_age: float = 3600, min_refresh: float = 60
    ) -> None:
        self.max_age = max_age
        self.min_refresh = min_refresh
        self.keys: dict[str, tuple[Mapping[str, Any], Any]] = {}
        self.fetched_at = now
        self._missed = False
        self.update(jwks, now)

    def update(self, jwks: Mapping[str, Any], now: float) -> None:
        """Replace the keys (rotation). Keys that do not parse, or lack a kid, are skipped."""
        from jwt import PyJWK, PyJWTError

        keys: dict[str, tuple[Mapping[str, Any], Any]] = {}
        listed = jwks.get("keys")
        for jwk in listed if isinstance(listed, list) else ():
            if not isinstance(jwk, Mapping) or not isinstance(jwk.get("kid"), str):
                continue
            if jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct":
                continue  # never a shared secret from a key set
            try:
                keys[jwk["kid"]] = (jwk, PyJWK(dict(jwk)).key)
            except (PyJWTError, ValueError, TypeError, KeyError):
                continue
        self.keys, self.fetched_at, self._missed = keys, now, False

    def get(self, kid: str | None) -> tuple[Mapping[str, Any], Any] | None:
        if kid is None:  # no kid: only unambiguous with a single key
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        found = self.keys.get(kid)
        if found is None:
            self._missed = True
        return found

    def needs_refresh(self, now: float) -> bool:
        age = now - self.fetched_at
        return age >= self.max_age or (self._missed and age >= self.min_refresh)


@dataclass(frozen=True, slots=True)
class JwtVerifier:
    """Checks tokens against ``algorithms`` (the configuration's, never the token's)."""

    algorithms: frozenset[str]
    hs_secret: bytes | None = None
    jwks: JwksCache | None = None
    audience: str | Sequence[str] | None = None
    """None: tokens carrying an ``aud`` are refused (PyJWT's rule)."""
    issuer: str | None = None
    leeway: float = 0.0
    tenant_claim: str = "tenant"

    def __post_init__(self) -> None:
        algs = self.algorithms
        unknown = algs - HMAC_ALGORITHMS - PUBLIC_ALGORITHMS
        if unknown or not algs:
            raise ValueError(f"JWT algorithms not supported: {sorted(unknown) or 'none given'}")
        if algs & HMAC_ALGORITHMS and not self.hs_secret:
            raise ValueError("HS* algorithms need a shared secret")
        if algs & PUBLIC_ALGORITHMS and self.jwks is None:
            raise ValueError("public-key algorithms need a JWKS")

    def _key(self, header: Mapping[str, Any]) -> Any | AuthFailure:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return unauthorized("algorithm not allowed")
        if alg in HMAC_ALGORITHMS:
            return self.hs_secret
        assert self.jwks is not None
        kid = header.get("kid")
        found = self.jwks.get(kid if isinstance(kid, str) else None)
        if found is None:
            return unauthorized("unknown key id")
        jwk, key = found
        return key if _fits(jwk, alg) else unauthorized("key does not fit the algorithm")

    def verify(
        self,
        token: str,
        now: float,
        *,
        audience: str | None = None,
        issuers: Sequence[str] | None = None,
    ) -> Identity | AuthFailure:
        """The token's identity; ``audience`` and ``issuers`` (an OAuth resource's)
        replace the configured ``aud`` and ``iss`` rules."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            key = self._key(header)
            if isinstance(key, AuthFailure):
                return key
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self.audience if audience is None else audience,
                issuer=self.issuer if issuers is None else issuers,
                options={
                    "require": ["exp"],
                    "verify_exp": False,  # checked below against the caller's clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            return unauthorized(f"missing claim {exc.claim}")
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            return unauthorized(_JWT_ERRORS.get(type(exc).__name__, "malformed token"))
        return self._identity(claims, now)

    def _identity(self, claims: Mapping[str, Any], now: float) -> Identity | AuthFailure:
        exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf", -math.inf))
        if exp is None or nbf is None:
            return unauthorized("malformed token")
        if now >= exp + self.leeway:
            return unauthorized("token expired")
        if now < nbf - self.leeway:
            return unauthorized("token not yet valid")
        tenant = claims.get(self.tenant_claim)
        subject = claims.get("sub")
        client_id = claims.get("client_id", claims.get("azp"))
        return Identity(
            "jwt",
            subject if isinstance(subject, str) else "",
            tenant if isinstance(tenant, str) else None,
            scopes=_scopes(claims),
            client_id=client_id if isinstance(client_id, str) else None,
        )


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """RFC 9068 ``scope`` (space-separated), or the ``scp`` list some servers use."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    return frozenset()


_JWT_ERRORS: Final = {
    "InvalidAudienceError": "invalid audience",
    "InvalidIssuerError": "invalid issuer",
    "InvalidSignatureError": "invalid signature",
}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)
