"""A real OAuth 2.1 authorization server for tests, built on the official MCP SDK's
authorization-server handlers (``mcp.server.auth``: RFC 8414 metadata, RFC 7591 dynamic
client registration, the authorization endpoint, and a token endpoint that checks PKCE
S256), served by hypercorn on trio in the test's nursery.

Access tokens are RS256 JWTs (RFC 9068 shape: ``iss``, ``sub``, ``aud`` = the RFC 8707
``resource`` the client asked for, ``client_id``, ``scope``, ``exp``), verifiable with the
key set at ``/jwks``. The authorization endpoint approves every request at once for the
user ``ada``: what a browser would show is not under test. ``mint(**claims)`` signs
other tokens with the same key, for the refusal cases.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    construct_redirect_uri,
)
from mcp.server.auth.routes import create_auth_routes
from mcp.server.auth.settings import ClientRegistrationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.asgi import serve_asgi
from tests.support.proxy_process import free_port

SUBJECT = "ada"
KID = "test-key-1"


@dataclass(eq=False)
class AuthServer:
    scopes: list[str]
    """The scopes the server grants (a client that asks for none gets all of them)."""
    port: int = field(default_factory=free_port)
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    clients: dict[str, OAuthClientInformationFull] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    issued: list[dict[str, Any]] = field(default_factory=list)
    """The claims of every access token the token endpoint issued."""

    @property
    def issuer(self) -> str:
        """As the SDK's metadata writes it (a URL with its root path)."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}jwks"

    def mint(self, **claims: Any) -> str:
        """A token signed with the server's key: a valid one for ``aud``, unless the
        claims say otherwise (None removes a claim)."""
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "sub": SUBJECT,
            "client_id": "minted",
            "scope": " ".join(self.scopes),
            "iat": now,
            "exp": now + 600,
        } | claims
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": KID})

    # -- the provider (mcp.server.auth.provider.OAuthAuthorizationServerProvider) -----------

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        code = secrets.token_urlsafe(32)
        assert client.client_id is not None
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or self.scopes,
            expires_at=time.time() + 300,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject=SUBJECT,
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        code = self.codes.get(authorization_code)
        return code if code is not None and code.client_id == client.client_id else None

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        self.codes.pop(authorization_code.code, None)
        claims = {
            "client_id": authorization_code.client_id,
            "scope": " ".join(authorization_code.scopes),
            "aud": authorization_code.resource,
        }
        token = self.mint(**claims)
        self.issued.append(jwt.decode(token, options={"verify_signature": False}))
        return OAuthToken(
            access_token=token, expires_in=600, scope=" ".join(authorization_code.scopes)
        )

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        return None  # none are issued

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        raise NotImplementedError

    async def load_access_token(self, token: str) -> AccessToken | None:
        return None  # resource servers verify the JWTs with the key set

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        return None

    # -- serving -------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        routes = create_auth_routes(
            cast("Any", self),
            issuer_url=AnyHttpUrl(self.issuer),
            client_registration_options=ClientRegistrationOptions(
                enabled=True, valid_scopes=self.scopes, default_scopes=self.scopes
            ),
        )
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        keys = {"keys": [jwk | {"kid": KID, "use": "sig", "alg": "RS256"}]}

        async def jwks(request: Request) -> JSONResponse:
            return JSONResponse(keys)

        return Starlette(routes=[*routes, Route("/jwks", jwks)])

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_asgi, self.build_app(), self.port))
            task_status.started(self.port)
