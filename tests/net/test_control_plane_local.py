"""The worker's control plane in-process, without PostgreSQL: the JWT set-up (a JWKS file
read at start, a JWKS URL fetched in the background from a real local HTTP server, key
rotation), the persisted snapshot that only moves forward, and a database that accepts
connections but never answers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.auth import AuthFailure, Identity
from proxy.config import from_mapping
from proxy.net import control_plane
from proxy.net.control_plane import ControlPlane
from proxy.net.database import Database
from proxy.observability import get_logger
from proxy.snapshot import Snapshot, snapshot_from_json
from proxy.store import postgres as store
from tests.support.backends import poll_until


def _key_and_jwk(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return key, jwk | {"kid": kid, "use": "sig", "alg": "RS256"}


KEY_1, JWK_1 = _key_and_jwk("one")
KEY_2, JWK_2 = _key_and_jwk("two")


def _token(key: rsa.RSAPrivateKey, kid: str) -> str:
    claims = {"sub": "svc", "tenant": "acme", "aud": "sb", "exp": time.time() + 60}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def _control(auth: dict[str, Any], **sections: dict[str, Any]) -> ControlPlane:
    config = from_mapping(
        {
            "auth": {"required": True, "jwt_algorithms": ["RS256"], "jwt_audience": "sb", **auth},
            "routes": [{"prefix": "/", "backends": ["http://127.0.0.1:9"]}],
            **sections,
        },
        "test",
    )
    return ControlPlane(config, 0, 1, get_logger("test"), lambda routes, addresses: None)


def test_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [JWK_1]}))
    control = _control({"jwt_jwks_file": str(path)})
    assert control.jwt is not None
    accepted = control.jwt.verify(_token(KEY_1, "one"), time.time())
    assert isinstance(accepted, Identity) and accepted.tenant == "acme"
    assert isinstance(control.jwt.verify(_token(KEY_2, "two"), time.time()), AuthFailure)


class _JwksServer:
    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": [JWK_1]}
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()


async def test_jwks_url_fetched_and_rotated(
    jwks_server: _JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_plane, "JWKS_CHECK_INTERVAL", 0.05)
    control = _control({"jwt_jwks_url": jwks_server.url})
    assert control.jwt is not None and control.jwt.jwks is not None
    jwks = control.jwt.jwks
    jwks.min_refresh = 0.2  # an unknown kid may trigger a refetch this soon
    # Nothing is fetched on the request path: before the task runs, no key is known.
    assert isinstance(control.jwt.verify(_token(KEY_1, "one"), time.time()), AuthFailure)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control._refresh_jwks_forever, jwks)
        await poll_until(lambda: "one" in jwks.keys, limit=5)
        assert isinstance(control.jwt.verify(_token(KEY_1, "one"), time.time()), Identity)

        # The identity provider rotates to key "two": the first token signed with it
        # fails (unknown kid) and asks for an early refetch.
        jwks_server.document = {"keys": [JWK_2]}
        assert isinstance(control.jwt.verify(_token(KEY_2, "two"), time.time()), AuthFailure)
        await poll_until(lambda: "two" in jwks.keys, limit=5)
        assert isinstance(control.jwt.verify(_token(KEY_2, "two"), time.time()), Identity)
        nursery.cancel_scope.cancel()
    assert jwks_server.fetches >= 2


def _snapshot(version: int) -> Snapshot:
    return Snapshot(version=version, routes=(), keys={})


async def test_persisted_snapshot_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [JWK_1]}))
    database = {"url": "postgresql://u:p@127.0.0.1:9/db", "state_dir": str(tmp_path)}
    control = _control({"jwt_jwks_file": str(path)}, database=database)
    await control._persist(_snapshot(5))
    # A slower worker that read version 3 must not replace 5 (a key revoked in 4 would
    # come back for a worker restarted during an outage).
    await control._persist(_snapshot(3))
    assert snapshot_from_json((tmp_path / "snapshot.json").read_bytes()).version == 5
    await control._persist(_snapshot(6))
    assert snapshot_from_json((tmp_path / "snapshot.json").read_bytes()).version == 6


async def test_a_database_that_never_answers_counts_as_down(nursery: trio.Nursery) -> None:
    """A listener that accepts and then says nothing (a frozen PgBouncer): calls give up
    after call_timeout instead of hanging, and the state says down."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    held: list[trio.SocketStream] = []

    async def accept_and_ignore() -> None:
        async with listener:
            while True:
                held.append(await listener.accept())

    nursery.start_soon(accept_and_ignore)
    port = listener.socket.getsockname()[1]
    states: list[bool] = []
    db = Database(
        f"postgresql://u:p@127.0.0.1:{port}/db",
        connect_timeout=5.0,
        call_timeout=0.5,
        on_state_change=states.append,
    )
    # "did not answer": the call's own timeout gave up, not the (longer) connect timeout.
    with pytest.raises(store.StoreUnavailable, match=r"did not answer within 0\.5 s"):
        await db.run(store.current_version)
    assert states == [False] and db.down_since is not None
