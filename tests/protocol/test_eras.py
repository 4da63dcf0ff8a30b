"""What the two MCP eras require of a message (``proxy.protocol.eras``): the rules a
2026-07-28 server applies before a request reaches a handler, and reading the answer to
one request."""

from __future__ import annotations

import json
from typing import Any

from proxy.protocol.eras import CLIENT_CAPABILITIES_META_KEY, refusal, response_to
from proxy.protocol.jsonrpc import PROTOCOL_VERSION_META_KEY


def message(method: str = "tools/call") -> dict[str, Any]:
    meta = {PROTOCOL_VERSION_META_KEY: "2026-07-28", CLIENT_CAPABILITIES_META_KEY: {}}
    return {"jsonrpc": "2.0", "id": 9, "method": method, "params": {"_meta": meta}}


def test_what_a_2026_07_28_server_refuses_is_refused_here() -> None:
    for method in ("initialize", "ping", "logging/setLevel", "resources/subscribe"):
        assert refusal(message(method), 9) == (
            404,
            b'{"jsonrpc":"2.0","id":9,"error":{"code":-32601,"message":"Method not found"}}',
        )
    bare = message()
    del bare["params"]["_meta"][CLIENT_CAPABILITIES_META_KEY]
    refused = refusal(bare, 9)
    assert refused is not None and refused[0] == 400
    assert json.loads(refused[1])["error"]["code"] == -32602
    future = message()
    future["params"]["_meta"][PROTOCOL_VERSION_META_KEY] = "2099-01-01"
    refused = refusal(future, 9)
    assert refused is not None and refused[0] == 400
    assert json.loads(refused[1])["error"]["data"] == {
        "supported": ["2026-07-28"],
        "requested": "2099-01-01",
    }
    assert refusal(message(), 9) is None


def test_the_answer_to_a_request_is_told_from_anything_else() -> None:
    answer = b'{"jsonrpc":"2.0","id":9,"result":{}}'
    assert response_to(answer, 9) == {"jsonrpc": "2.0", "id": 9, "result": {}}
    assert response_to(answer, 10) is None
    assert response_to(b'{"jsonrpc":"2.0","method":"notifications/progress"}', 9) is None
    assert response_to(b"[1, 2]", 9) is None
    assert response_to(b"not json", 9) is None
