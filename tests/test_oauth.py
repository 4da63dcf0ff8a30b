"""proxy.oauth: routes as OAuth protected resources. Pure: metadata, challenges, the
token rules (audience, issuer, expiry, algorithm, scopes) and the config checks."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from proxy.auth import AuthFailure, Identity, JwtVerifier
from proxy.config import ConfigError, OAuthConfig, RouteConfig, from_mapping
from proxy.oauth import (
    OAuthResource,
    authenticate_oauth,
    metadata_documents,
    oauth_config_problem,
)

SECRET = b"an-oauth-test-secret-of-32-bytes-or-more"
RESOURCE = "https://mcp.example.com/mcp"
ISSUER = "https://auth.example.com"
OAUTH = OAuthConfig(
    resource=RESOURCE,
    authorization_servers=(ISSUER,),
    scopes=("mcp",),
    tool_scopes={"deploy": "mcp:admin"},
    caller_headers={"subject": "X-Caller", "scopes": "x-caller-scopes"},
)
THE_RESOURCE = OAuthResource.from_config(OAUTH)
METADATA_URL = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
VERIFIER = JwtVerifier(algorithms=frozenset({"HS256"}), hs_secret=SECRET)


def token(**claims: Any) -> str:
    payload = {
        "sub": "ada",
        "iss": ISSUER,
        "aud": RESOURCE,
        "exp": time.time() + 60,
        "scope": "mcp",
        "client_id": "app",
    } | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET)


def caller(credential: str | None) -> Identity | AuthFailure:
    headers = [(b"host", b"mcp.example.com")]
    if credential is not None:
        headers.append((b"authorization", b"Bearer " + credential.encode()))
    return authenticate_oauth(headers, VERIFIER, THE_RESOURCE, now=time.time())


def test_the_metadata_names_the_resource_its_servers_and_scopes() -> None:
    assert THE_RESOURCE.metadata_url == METADATA_URL
    assert json.loads(THE_RESOURCE.metadata()) == {
        "resource": RESOURCE,
        "authorization_servers": [ISSUER],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp", "mcp:admin"],
    }
    documents = metadata_documents([THE_RESOURCE])
    # The path-suffixed form, and the bare one for the only resource.
    assert set(documents) == {
        b"/.well-known/oauth-protected-resource/mcp",
        b"/.well-known/oauth-protected-resource",
    }


def test_the_bare_metadata_path_is_not_guessed_between_resources() -> None:
    other = OAuthResource.from_config(
        OAuthConfig(resource="https://mcp.example.com/other", authorization_servers=(ISSUER,))
    )
    assert set(metadata_documents([THE_RESOURCE, other])) == {
        b"/.well-known/oauth-protected-resource/mcp",
        b"/.well-known/oauth-protected-resource/other",
    }


def test_a_valid_token_is_the_caller() -> None:
    identity = caller(token(scope="mcp mcp:admin"))
    assert isinstance(identity, Identity)
    assert (identity.subject, identity.client_id) == ("ada", "app")
    assert identity.scopes == frozenset({"mcp", "mcp:admin"})
    assert THE_RESOURCE.caller_header_values(identity) == [
        (b"x-caller", b"ada"),
        (b"x-caller-scopes", b"mcp mcp:admin"),
    ]


def test_no_token_gets_the_challenge_without_an_error() -> None:
    failure = caller(None)
    assert isinstance(failure, AuthFailure) and failure.status == 401
    assert failure.www_authenticate == (
        f'Bearer resource_metadata="{METADATA_URL}", scope="mcp"'.encode()
    )


def _unsigned() -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"sub": "mallory", "iss": ISSUER, "aud": RESOURCE, "exp": time.time() + 60}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize(
    ("credential", "why"),
    [
        (token(aud="https://other.example.com/mcp"), "invalid audience"),
        (token(aud=None), "missing claim aud"),
        (token(iss="https://evil.example.com"), "invalid issuer"),
        (token(exp=time.time() - 600), "token expired"),
        (_unsigned(), "algorithm not allowed"),
        (
            jwt.encode({"sub": "x", "aud": RESOURCE, "iss": ISSUER, "exp": 9e9}, b"w" * 40),
            "invalid signature",
        ),
        ("sb_abcdefgh_an-api-key", "not a bearer token (JWT) for this resource"),
    ],
)
def test_a_token_not_for_this_resource_gets_401_invalid_token(credential: str, why: str) -> None:
    failure = caller(credential)
    assert isinstance(failure, AuthFailure) and failure.status == 401, failure
    assert failure.description == why
    assert failure.www_authenticate == (
        f'Bearer error="invalid_token", resource_metadata="{METADATA_URL}", scope="mcp"'.encode()
    )


def test_a_token_without_the_routes_scope_gets_403_naming_it() -> None:
    failure = caller(token(scope="other"))
    assert isinstance(failure, AuthFailure) and failure.status == 403
    assert failure.www_authenticate == (
        f'Bearer error="insufficient_scope", resource_metadata="{METADATA_URL}", '
        'scope="mcp"'.encode()
    )


def test_tool_scopes() -> None:
    plain = caller(token())
    admin = caller(token(scope="mcp mcp:admin"))
    assert isinstance(plain, Identity) and isinstance(admin, Identity)
    assert THE_RESOURCE.tool_scope_missing(plain, "deploy") == "mcp:admin"
    assert THE_RESOURCE.tool_scope_missing(admin, "deploy") is None
    assert THE_RESOURCE.tool_scope_missing(plain, "echo") is None


def route(**oauth: Any) -> RouteConfig:
    return RouteConfig(
        prefix="/mcp", backends=("http://127.0.0.1:9000",), kind="mcp", oauth=OAuthConfig(**oauth)
    )


@pytest.mark.parametrize(
    ("oauth", "key"),
    [
        ({"authorization_servers": (ISSUER,)}, "resource"),
        ({"resource": "mcp.example.com/mcp", "authorization_servers": (ISSUER,)}, "resource"),
        ({"resource": RESOURCE + "#frag", "authorization_servers": (ISSUER,)}, "resource"),
        ({"resource": RESOURCE}, "authorization_servers"),
        ({"resource": RESOURCE, "authorization_servers": ("auth",)}, "authorization_servers"),
        ({"resource": RESOURCE, "authorization_servers": (ISSUER,), "scopes": ('a"b',)}, "scopes"),
        (
            {
                "resource": RESOURCE,
                "authorization_servers": (ISSUER,),
                "caller_headers": {"who": "x"},
            },
            "caller_headers",
        ),
    ],
)
def test_config_problems_name_their_key(oauth: dict[str, Any], key: str) -> None:
    problem = oauth_config_problem(route(**oauth))
    assert problem is not None and problem[0] == key


def test_an_oauth_route_needs_jwt_algorithms() -> None:
    routes = [
        {
            "prefix": "/mcp",
            "backends": ["http://127.0.0.1:9000"],
            "kind": "mcp",
            "oauth": {"resource": RESOURCE, "authorization_servers": [ISSUER]},
        }
    ]
    with pytest.raises(ConfigError) as raised:
        from_mapping({"routes": routes, "mcp": {"session_keys": {"k": "s" * 32}}}, "t.toml")
    assert "routes[0].oauth.resource" in str(raised.value)
    config = from_mapping(
        {
            "routes": routes,
            "auth": {"jwt_algorithms": ["HS256"], "jwt_secret": "s" * 32},
            "mcp": {"session_keys": {"k": "s" * 32}},
        },
        "t.toml",
    )
    assert config.routes[0].oauth.resource == RESOURCE
