"""The machine sending 2026-07-28 requests within upstream sessions on a route whose
backends speak only 2025-11-25 (``backend_era``, ``proxy.protocol.upstream_sessions``):
waiting while a session is opened, reusing it, answering ``server/discover`` itself,
rewriting answers event by event, and opening a new session when the backend forgets
one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.protocol.era_probe import ProbeRequest
from proxy.protocol.exchange import Check
from proxy.protocol.upstream_sessions import SessionRefused, SessionRequest, UpstreamSession
from tests.support.machine import World, make_config
from tests.support.machine_traffic import JWT_AUTH, ROUTES, SSE_HEAD, chunk, mcp_post, ok
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

OLD_ROUTE = {
    "prefix": "/old",
    "kind": "mcp",
    "backends": ["http://10.0.8.1:80"],
    "backend_era": "2025-11-25",
}
INIT_RESULT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {}},
    "serverInfo": {"name": "old", "version": "1"},
}


def world() -> World:
    return World(make_config((*ROUTES, OLD_ROUTE), auth=JWT_AUTH))


def modern(method: str, request_id: int = 3, name: str | None = None) -> bytes:
    params: dict[str, Any] = {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "agent", "version": "1"},
        }
    }
    headers = [b"MCP-Protocol-Version: 2026-07-28", b"Mcp-Method: " + method.encode()]
    if name is not None:
        params["name"] = name
        headers.append(b"Mcp-Name: " + name.encode())
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    return mcp_post(body.encode(), *headers, target=b"/old")


def waits_for_session(w: World) -> SessionRequest:
    assert w.state == "ADMISSION"
    check = w.t.checks[-1]
    assert check.kind == Check.SESSION and isinstance(check.arg, SessionRequest)
    return check.arg


def json_answer(reply: dict[str, Any], status: bytes = b"200 OK") -> bytes:
    body = json.dumps({"jsonrpc": "2.0", **reply}).encode()
    return ok(body, b"Content-Type: application/json", status=status)


def test_a_request_waits_for_its_session_then_goes_within_it(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="count"))
    request = waits_for_session(w)
    assert request.target == b"/old"
    assert json.loads(request.body)["params"]["clientInfo"] == {"name": "agent", "version": "1"}
    assert w.t.upstreams == []  # nothing went up yet
    session = UpstreamSession("backend-1", INIT_RESULT)
    w.env.upstream_sessions.put(request.key, session)
    w.c.admitted(session)
    sent = backend_request(w.t.up.sent)
    assert sent.header(b"mcp-session-id") == b"backend-1"
    assert sent.header(b"mcp-protocol-version") == b"2025-11-25"
    assert sent.header(b"mcp-method") is None and sent.header(b"mcp-name") is None
    assert json.loads(sent.body)["params"] == {"name": "count"}
    w.answer(json_answer({"id": 3, "result": {"content": []}}), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert json.loads(answer.body)["result"] == {"content": [], "resultType": "complete"}
    [x] = w.accounted
    assert x.mcp is not None and x.mcp.translated_to == "2025-11-25"


def test_a_session_in_hand_is_used_at_once(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/list"))
    request = waits_for_session(w)
    w.env.upstream_sessions.put(request.key, UpstreamSession("backend-1", INIT_RESULT))
    w.t.checks.clear()
    w2 = world()
    w2.env.upstream_sessions = w.env.upstream_sessions
    w2.feed(modern("tools/list", 4))
    assert w2.t.checks == []
    assert backend_request(w2.t.up.sent).header(b"mcp-session-id") == b"backend-1"


def test_discover_is_answered_here_from_the_sessions_initialize(bytewise: bool) -> None:
    w = world()
    w.feed(modern("server/discover", 6))
    request = waits_for_session(w)
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    answer = client_answer(w.t.take_client(), b"POST")
    result = json.loads(answer.body)["result"]
    assert result["supportedVersions"] == ["2026-07-28"]
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "old"
    assert w.t.upstreams == [] and request.key[0]


def test_a_refused_session_is_the_clients_error(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/list"))
    waits_for_session(w)
    w.c.admitted(SessionRefused(502, "backend answered initialize with status 500"))
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 502
    assert "initialize" in json.loads(answer.body)["error"]["message"]


def test_streamed_events_are_rewritten_each_once_whole(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="count"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    w.t.take_client()
    progress = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    result = b'data: {"jsonrpc":"2.0","id":3,"result":{"content":[]}}\n\n'
    w.answer(SSE_HEAD + chunk(progress) + chunk(result[:20]), byte_at_a_time=bytewise)
    first = w.t.take_client()
    assert client_answer(first, b"POST").body == progress  # the rest waits for its end
    w.answer(chunk(result[20:]) + b"0\r\n\r\n", byte_at_a_time=bytewise)
    body = client_answer(first + w.t.take_client(), b"POST").body
    assert body.startswith(progress)
    assert json.loads(body[len(progress) + 6 : -2]) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"content": [], "resultType": "complete"},
    }


def test_a_forgotten_session_is_opened_again_and_the_request_sent_once_more(
    bytewise: bool,
) -> None:
    w = world()
    w.feed(modern("tools/list"))
    request = waits_for_session(w)
    w.env.upstream_sessions.put(request.key, UpstreamSession("backend-1", INIT_RESULT))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    lost = json_answer({"id": None, "error": {"code": -32600, "message": "Session not found"}})
    w.answer(lost.replace(b"200 OK", b"404 Not Found"), byte_at_a_time=bytewise)
    assert w.t.take_client() == b""  # the client sees none of it
    assert w.env.upstream_sessions.get(request.key) is None
    waits_for_session(w)
    w.c.admitted(UpstreamSession("backend-2", INIT_RESULT))
    sent = backend_request(w.t.upstreams[-1].sent)
    assert sent.header(b"mcp-session-id") == b"backend-2"
    w.answer(json_answer({"id": 3, "result": {"tools": []}}), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert json.loads(answer.body)["result"]["cacheScope"] == "private"


def test_a_session_lost_twice_is_the_backends_answer(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/list"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    lost = json_answer({"id": None, "error": {"code": -32600, "message": "Session not found"}})
    lost = lost.replace(b"200 OK", b"404 Not Found")
    w.answer(lost, byte_at_a_time=bytewise)
    w.c.admitted(UpstreamSession("backend-2", INIT_RESULT))
    w.answer(lost, byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client(), b"POST").status == 404


def test_notifications_are_accepted_here(bytewise: bool) -> None:
    w = world()
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {}})
    w.feed(
        mcp_post(
            note.encode(),
            b"MCP-Protocol-Version: 2026-07-28",
            b"Mcp-Method: notifications/cancelled",
            target=b"/old",
        )
    )
    assert client_answer(w.t.take_client(), b"POST").status == 202
    assert w.t.checks == [] and w.t.upstreams == []


def test_a_method_2026_07_28_removed_is_refused_as_its_servers_refuse_it(bytewise: bool) -> None:
    w = world()
    w.feed(modern("ping", 8), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 404 and json.loads(answer.body)["error"]["code"] == -32601
    assert w.t.checks == [] and w.t.upstreams == []


def test_an_error_answer_gets_the_status_2026_07_28_gives_it(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="nope"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    w.answer(json_answer({"id": 3, "error": {"code": -32601, "message": "Unknown tool"}}))
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 404 and json.loads(answer.body)["error"]["code"] == -32601


def cancelled(w: World) -> list[dict[str, Any]]:
    return [json.loads(body) for _, _, _, body in w.t.notified]


def test_a_client_leaving_before_the_answer_head_cancels_upstream(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="count"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    w.c.client_closed()
    [(backend, target, headers, _)] = w.t.notified
    assert (backend.url, target) == ("http://10.0.8.1:80", b"/old")
    assert dict(headers)[b"mcp-session-id"] == b"backend-1"
    assert cancelled(w) == [
        {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 3, "reason": "the client closed its stream"},
        }
    ]
    w.c.client_closed(reset=True)  # told again: still once
    assert len(w.t.notified) == 1


def test_a_client_leaving_a_stream_before_its_answer_cancels_upstream(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="count"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    progress = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    w.answer(SSE_HEAD + chunk(progress), byte_at_a_time=bytewise)
    assert w.state == "STREAM"
    w.c.client_closed()
    assert [m["params"]["requestId"] for m in cancelled(w)] == [3]


def test_a_client_leaving_after_its_answer_cancels_nothing(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="count"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    result = b'data: {"jsonrpc":"2.0","id":3,"result":{"content":[]}}\n\n'
    w.answer(SSE_HEAD + chunk(result), byte_at_a_time=bytewise)
    w.c.client_closed()
    assert w.t.notified == []


def test_a_whole_stream_of_one_error_goes_out_as_json_with_its_status(bytewise: bool) -> None:
    w = world()
    w.feed(modern("tools/call", name="nope"))
    w.c.admitted(UpstreamSession("backend-1", INIT_RESULT))
    error = b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"Unknown tool"}}'
    stream = b"id: 1\ndata: \n\nevent: message\ndata: " + error + b"\n\n"
    w.answer(ok(stream, b"Content-Type: text/event-stream"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert (answer.status, answer.header(b"content-type")) == (404, b"application/json")
    assert answer.body == error


def listen_request(*uris: str) -> bytes:
    params: dict[str, Any] = {
        "notifications": {"toolsListChanged": True, "resourceSubscriptions": list(uris)},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    }
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 9, "method": "subscriptions/listen", "params": params}
    )
    headers = (b"MCP-Protocol-Version: 2026-07-28", b"Mcp-Method: subscriptions/listen")
    return mcp_post(body.encode(), *headers, target=b"/old")


def test_a_listen_is_the_get_stream_of_a_session_of_its_own(bytewise: bool) -> None:
    w = world()
    w.feed(listen_request("test://a"), byte_at_a_time=bytewise)
    request = waits_for_session(w)
    assert request.dedicated
    assert [json.loads(b)["params"]["uri"] for b in request.subscribe] == ["test://a"]
    w.c.admitted(UpstreamSession("listen-session", INIT_RESULT))
    sent = backend_request(w.t.up.sent)
    assert (sent.method, sent.body) == (b"GET", b"")
    assert sent.header(b"mcp-session-id") == b"listen-session"
    assert sent.header(b"accept") == b"text/event-stream"
    assert sent.header(b"content-length") is None
    assert w.env.upstream_sessions.get(request.key) is None  # not the shared one
    changed = b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n'
    log = b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'
    w.answer(SSE_HEAD + chunk(log + changed), byte_at_a_time=bytewise)
    body = client_answer(w.t.take_client(), b"POST").body
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert [e["method"] for e in events] == [
        "notifications/subscriptions/acknowledged",
        "notifications/tools/list_changed",
    ]
    assert {e["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] for e in events} == {9}
    w.c.client_closed()  # the listen ends: so does the backend's GET
    assert w.t.up.finished is not None and not w.t.up.finished["reusable"]
    assert w.t.notified == []


def auto_world() -> World:
    route = {**OLD_ROUTE, "prefix": "/auto", "backend_era": "auto"}
    return World(make_config((*ROUTES, route), auth=JWT_AUTH))


def test_an_auto_route_probes_once_then_translates_for_what_it_found(bytewise: bool) -> None:
    w = auto_world()
    w.feed(modern("tools/list").replace(b"POST /old ", b"POST /auto "), byte_at_a_time=bytewise)
    assert w.state == "ADMISSION"
    [probe] = w.t.checks
    assert probe.kind == Check.PROBE and isinstance(probe.arg, ProbeRequest)
    assert probe.arg.route == "/auto"
    w.env.route_eras.learn("/auto", "2025-11-25", w.env.now())  # as the worker's probe does
    w.c.admitted("2025-11-25")
    assert w.t.checks[-1].kind == Check.SESSION  # translated: it needs an upstream session
    w2 = auto_world()
    w2.env.route_eras = w.env.route_eras
    w2.feed(modern("tools/list").replace(b"POST /old ", b"POST /auto "))
    assert [c.kind for c in w2.t.checks] == [Check.SESSION]  # no second probe


def test_an_auto_route_whose_backends_speak_both_eras_passes_requests_as_they_came(
    bytewise: bool,
) -> None:
    w = auto_world()
    w.env.route_eras.learn("/auto", "any", w.env.now())
    request = modern("tools/list").replace(b"POST /old ", b"POST /auto ")
    w.feed(request, byte_at_a_time=bytewise)
    assert w.t.checks == []
    assert request.endswith(backend_request(w.t.up.sent).body)
