"""Routes served as OAuth 2.1 protected resources (MCP authorization, 2025-11-25 and
2026-07-28). Pure: no I/O.

A route with ``oauth.resource`` set is one resource:

- Its RFC 9728 Protected Resource Metadata (``resource``, ``authorization_servers``,
  ``scopes_supported``, ``bearer_methods_supported``) is answered by the proxy itself at
  the path-suffixed metadata URL of the resource (``/.well-known/oauth-protected-resource``
  followed by the resource's path), and at the bare ``/.well-known/oauth-protected-resource``
  where the resource's path is ``/`` or where it is the only OAuth route.
- Only bearer JWTs are credentials there (API keys are not): signed with an algorithm of
  ``auth.jwt_algorithms``, unexpired, issued by one of ``authorization_servers`` (``iss``)
  and minted for this resource (``aud``, RFC 8707): a token for another resource is
  refused, so no token is ever good for two services.
- A request without a valid token gets 401 with ``WWW-Authenticate: Bearer
  resource_metadata="…"`` (and ``scope="…"`` where the route needs scopes), from which an
  MCP client discovers where to get one; a token without the route's scopes, or a
  ``tools/call`` of a tool whose scope it lacks, gets 403 ``error="insufficient_scope"``
  with the scope to ask for.
- The client's token is not passed on (``forward_credentials`` says otherwise); the
  backend learns who calls from ``caller_headers``, which the proxy sets and never copies
  from the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import msgspec

from proxy.auth import (
    AuthFailure,
    Headers,
    Identity,
    JwtVerifier,
    credential_of,
    forbidden,
    unauthorized,
)
from proxy.config import OAuthConfig, RouteConfig

METADATA_PATH: Final = "/.well-known/oauth-protected-resource"
CALLER_FIELDS: Final = ("subject", "client_id", "scopes")
_TOKEN_CHARS = frozenset(
    "!#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)


def oauth_config_problem(route: RouteConfig) -> tuple[str, str] | None:
    """(the key under ``oauth``, what is wrong), or None for a valid ``route.oauth``."""
    oauth = route.oauth
    if not oauth.resource:
        return ("resource", "the other oauth settings need a resource")
    parts = urlsplit(oauth.resource)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
        return ("resource", f"not an absolute http(s) URI without a fragment: {oauth.resource!r}")
    if route.auth == "none":
        return ("resource", 'an OAuth resource cannot be a route with auth = "none"')
    if not oauth.authorization_servers:
        return ("authorization_servers", "an OAuth resource needs at least one")
    for issuer in oauth.authorization_servers:
        if urlsplit(issuer).scheme not in ("https", "http") or not urlsplit(issuer).netloc:
            return ("authorization_servers", f"not an issuer URL: {issuer!r}")
    for scope in (*oauth.scopes, *oauth.tool_scopes.values()):
        if not scope or not set(scope) <= _TOKEN_CHARS:
            return ("scopes", f"not a scope token (RFC 6749 §3.3): {scope!r}")
    for name, header in oauth.caller_headers.items():
        if name not in CALLER_FIELDS:
            return ("caller_headers", f"{name!r} is not one of {', '.join(CALLER_FIELDS)}")
        if not header or not header.replace("-", "").isalnum():
            return ("caller_headers", f"not a header name: {header!r}")
    return None


@dataclass(frozen=True, slots=True)
class OAuthResource:
    """One route's resource: its metadata, challenges and scope rules."""

    resource: str
    metadata_url: str
    issuers: tuple[str, ...]
    scopes: tuple[str, ...]
    tool_scopes: dict[str, str] = field(default_factory=dict)
    caller_headers: tuple[tuple[str, bytes], ...] = ()
    """(field, lower-case header name) pairs."""

    @classmethod
    def from_config(cls, oauth: OAuthConfig) -> OAuthResource:
        parts = urlsplit(oauth.resource)
        path = parts.path.rstrip("/")
        return cls(
            resource=oauth.resource,
            metadata_url=f"{parts.scheme}://{parts.netloc}{METADATA_PATH}{path}",
            issuers=oauth.authorization_servers,
            scopes=oauth.scopes,
            tool_scopes=dict(oauth.tool_scopes),
            caller_headers=tuple(
                (name, header.lower().encode("ascii"))
                for name, header in oauth.caller_headers.items()
            ),
        )

    @property
    def metadata_path(self) -> str:
        return urlsplit(self.metadata_url).path

    def metadata(self) -> bytes:
        supported = sorted({*self.scopes, *self.tool_scopes.values()})
        document: dict[str, object] = {
            "resource": self.resource,
            "authorization_servers": list(self.issuers),
            "bearer_methods_supported": ["header"],
        }
        if supported:
            document["scopes_supported"] = supported
        return msgspec.json.encode(document)

    def challenge(self, failure: AuthFailure, *, scope: Sequence[str] | None = None) -> AuthFailure:
        """``failure`` with the resource's challenge: where its metadata is, the scopes
        to ask for, and (except where no credential came) the error."""
        wanted = " ".join(scope if scope is not None else self.scopes)
        parts = [f'resource_metadata="{self.metadata_url}"']
        if wanted:
            parts.append(f'scope="{wanted}"')
        if failure.error is not None:
            parts.insert(0, f'error="{failure.error}"')
        challenge = ("Bearer " + ", ".join(parts)).encode("ascii")
        return AuthFailure(failure.status, failure.description, challenge, failure.error)

    def missing_scopes(self, identity: Identity) -> tuple[str, ...]:
        have = identity.scopes or frozenset()
        return tuple(s for s in self.scopes if s not in have)

    def tool_scope_missing(self, identity: Identity, tool: str | None) -> str | None:
        """The scope ``tool``'s call needs and the identity lacks, if any."""
        needed = self.tool_scopes.get(tool) if tool is not None else None
        if needed is None or needed in (identity.scopes or ()):
            return None
        return needed

    def caller_header_values(self, identity: Identity) -> list[tuple[bytes, bytes]]:
        values = {
            "subject": identity.subject,
            "client_id": identity.client_id or "",
            "scopes": " ".join(sorted(identity.scopes or ())),
        }
        return [
            (header, values[name].encode("latin-1", "replace"))
            for name, header in self.caller_headers
        ]


def insufficient_scope(resource: OAuthResource, scopes: Sequence[str], why: str) -> AuthFailure:
    return resource.challenge(forbidden(why), scope=scopes)


def metadata_documents(resources: Sequence[OAuthResource]) -> dict[bytes, bytes]:
    """Path -> the metadata document the proxy answers there."""
    documents = {r.metadata_path.encode("ascii"): r.metadata() for r in resources}
    bare = METADATA_PATH.encode("ascii")
    roots = [r for r in resources if r.metadata_path == METADATA_PATH]
    if not roots and len(resources) == 1:
        documents[bare] = resources[0].metadata()
    return documents


def authenticate_oauth(
    headers: Headers,
    verifier: JwtVerifier | None,
    resource: OAuthResource,
    *,
    now: float,
) -> Identity | AuthFailure:
    """The caller of an OAuth resource: a bearer JWT minted for it, with the route's
    scopes; a challenge naming the resource's metadata otherwise."""
    credential = credential_of(headers, b"authorization")
    if credential is None:
        return resource.challenge(unauthorized("credentials required", error=None))
    if isinstance(credential, AuthFailure):
        return resource.challenge(credential)
    token = credential.decode("ascii", "replace")
    if verifier is None or token.count(".") != 2:
        return resource.challenge(unauthorized("not a bearer token (JWT) for this resource"))
    identity = verifier.verify(token, now, audience=resource.resource, issuers=resource.issuers)
    if isinstance(identity, AuthFailure):
        return resource.challenge(identity)
    missing = resource.missing_scopes(identity)
    if missing:
        return insufficient_scope(resource, resource.scopes, f"token lacks scope {missing[0]}")
    return identity
