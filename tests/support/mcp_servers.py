"""Official-SDK MCP servers for tests, served by hypercorn on trio in the test's nursery.

``McpBackend(replica)`` builds an ``MCPServer`` named after its replica and serves it on
127.0.0.1:0 (``port = await nursery.start(backend.serve)``), either over Streamable HTTP
at ``/mcp`` (both protocol eras: the 2025-11-25 initialize handshake with
``Mcp-Session-Id`` sessions, and 2026-07-28 single-exchange requests) or, with
``legacy=True``, over the 2024-11-05 HTTP+SSE transport (``GET /sse``, then POSTs to
``/messages/?session_id=...``). The SDK's DNS-rebinding checks are off: a proxy forwards
the client's Host.

Tools, the same on both transports:

- ``whoami()`` returns the replica name and records (the session id the backend saw,
  the replica) in ``whoami_calls``: the backend's own id, from ``Mcp-Session-Id`` or the
  legacy ``session_id`` query parameter; None for a sessionless 2026-07-28 request.
- ``count(n, delay)`` sends ``n`` progress notifications ``delay`` s apart, then returns
  "counted n".
- ``greet_user()`` asks the client for a name by elicitation (a server-to-client request
  mid-call on handshake-era connections, an ``InputRequiredResult`` round at
  2026-07-28) and returns "hello <name> from <replica>".
- resource ``test://replica`` (text: the replica name) and prompt ``describe(topic)``.

Every HTTP request the backend receives is recorded in ``requests`` (before the app sees
it), and every ``Mcp-Session-Id`` it hands out in ``sessions_created`` (Streamable HTTP;
a legacy session id is only seen in the ``endpoint`` event and in later POSTs).

Also here, for tests that speak MCP over plain HTTP: JSON-RPC bodies for both eras
(``initialize_body``, ``handshake_request``, ``modern_request``) and ``rpc_response``,
which reads the JSON-RPC response out of a JSON or ``text/event-stream`` answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any
from urllib.parse import parse_qs

import anyio
import trio
from mcp.server.caching import CacheableMethod, CacheHint
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import EmptyResult, ListToolsResult, PaginatedRequestParams, SubscribeRequestParams
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.demo.backend import root_logging_preserved
from tests.support.asgi import serve_asgi

__all__ = [
    "HANDSHAKE_VERSION",
    "MCP_ACCEPT",
    "MODERN_VERSION",
    "REPLICA_URI",
    "TOOL_NAMES",
    "McpBackend",
    "NameForm",
    "SeenRequest",
    "handshake_request",
    "initialize_body",
    "modern_headers",
    "modern_request",
    "rpc_response",
]

MCP_PATH = "/mcp"
SSE_PATH = "/sse"
MESSAGE_PATH = "/messages/"
REPLICA_URI = "test://replica"
TOOL_NAMES = frozenset({"whoami", "count", "greet_user"})
HANDSHAKE_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
MCP_ACCEPT = "application/json, text/event-stream"
_VERSION_META = "io.modelcontextprotocol/protocolVersion"


class NameForm(BaseModel):
    """What ``greet_user`` elicits."""

    name: str


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One HTTP request as the backend received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytearray = field(default_factory=bytearray)
    """The request body as far as the app has read it."""

    def message(self) -> dict[str, Any]:
        """The JSON-RPC message the body holds."""
        decoded = json.loads(self.body)
        assert isinstance(decoded, dict)
        return decoded

    @property
    def session_id(self) -> str | None:
        """The session the request names: Mcp-Session-Id, or the legacy query parameter."""
        header = self.headers.get("mcp-session-id")
        if header is not None:
            return header
        values = parse_qs(self.query).get("session_id")
        return values[0] if values else None


def ask_name() -> Elicit[NameForm]:
    """The resolver behind ``greet_user`` (module level: the SDK evaluates annotations
    in the tool function's module)."""
    return Elicit("What is your name?", NameForm)


def _session_seen(ctx: Context[Any, Any]) -> str | None:
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    if headers is not None and headers.get("mcp-session-id"):
        return str(headers["mcp-session-id"])
    query = getattr(request, "query_params", None)
    if query is not None and query.get("session_id"):
        return str(query["session_id"])
    return None


class _PagedServer(MCPServer[Any]):
    """An ``MCPServer`` whose ``tools/list`` comes in pages of ``page_size`` tools, the
    cursor being the index of the page's first tool."""

    page_size = 0

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        tools = await self.list_tools()
        if not self.page_size:
            return ListToolsResult(tools=tools)
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + self.page_size
        return ListToolsResult(
            tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
        )


@dataclass(eq=False)
class McpBackend:
    replica: str
    legacy: bool = False
    """Serve the 2024-11-05 HTTP+SSE transport instead of Streamable HTTP."""
    json_response: bool = False
    """Streamable HTTP: answer requests with one JSON body instead of an SSE stream."""
    tools_page_size: int = 0
    """Answer ``tools/list`` in pages of this many tools (0: one page)."""
    public_lists: bool = False
    """Mark list results (2026-07-28) ``cacheScope: public`` with a 60 s ``ttlMs``."""
    subscriptions: bool = False
    """Handshake era: take ``resources/subscribe`` (recorded in ``subscribed``), and
    offer a tool ``touch()`` that sends ``notifications/resources/updated`` for
    ``test://replica`` to every session subscribed to it, on that session's GET stream."""
    subscribed: list[str] = field(default_factory=list)
    handshake_only: bool = False
    """Streamable HTTP: speak the handshake era only (2025-11-25 and before), as servers
    on earlier SDKs do. A request with a 2026-07-28 ``MCP-Protocol-Version`` gets 400
    with JSON-RPC -32022 "Unsupported protocol version"."""
    modern_only: bool = False
    """Streamable HTTP: speak 2026-07-28 only. A request without a 2026-07-28
    ``MCP-Protocol-Version`` (initialize and every handshake-era request) gets 400 with
    JSON-RPC -32022 "Unsupported protocol version", a GET or DELETE 405 (recorded in
    ``requests`` all the same)."""
    port: int = 0
    whoami_calls: list[tuple[str | None, str]] = field(default_factory=list)
    requests: list[SeenRequest] = field(default_factory=list)
    sessions_created: list[str] = field(default_factory=list)
    elicited: list[str] = field(default_factory=list)
    """The names ``greet_user`` received."""

    @property
    def url(self) -> str:
        """The backend's base URL (what a proxy route lists)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """Where an SDK client connects directly: /mcp, or /sse for the legacy transport."""
        return self.url + (SSE_PATH if self.legacy else MCP_PATH)

    def mcp_posts(self) -> list[SeenRequest]:
        return [r for r in self.requests if r.method == "POST"]

    # -- the MCP server ---------------------------------------------------------------------

    def build_server(self) -> MCPServer[Any]:
        replica = self.replica
        hints: dict[CacheableMethod, CacheHint] | None = (
            {"tools/list": CacheHint(60_000, "public")} if self.public_lists else None
        )
        with root_logging_preserved():
            server = _PagedServer(f"test-{replica}", log_level="WARNING", cache_hints=hints)
        server.page_size = self.tools_page_size

        @server.tool()
        def whoami(ctx: Context[Any, Any]) -> str:
            """Return the name of the replica that answered."""
            self.whoami_calls.append((_session_seen(ctx), replica))
            return replica

        @server.tool()
        async def count(n: int, ctx: Context[Any, Any], delay: float = 0.0) -> str:
            """Report progress ``n`` times, ``delay`` seconds apart, then return "counted n"."""
            for i in range(1, n + 1):
                await anyio.sleep(delay)
                await ctx.report_progress(i, n, f"step {i}")
            return f"counted {n}"

        @server.tool()
        def greet_user(form: Annotated[NameForm, Resolve(ask_name)]) -> str:
            """Ask the client for a name, then greet it."""
            self.elicited.append(form.name)
            return f"hello {form.name} from {replica}"

        if self.subscriptions:
            self._offer_subscriptions(server)

        @server.resource(REPLICA_URI, name="replica", mime_type="text/plain")
        def replica_resource() -> str:
            return f"replica {replica}"

        @server.prompt()
        def describe(topic: str) -> str:
            """Ask for a description of ``topic``."""
            return f"Describe {topic} (asked of {replica})"

        return server

    def _offer_subscriptions(self, server: MCPServer[Any]) -> None:
        subscribers: list[Any] = []

        async def subscribe(
            ctx: ServerRequestContext[Any], params: SubscribeRequestParams
        ) -> EmptyResult:
            self.subscribed.append(str(params.uri))
            subscribers.append(ctx.session)
            return EmptyResult()

        server._lowlevel_server.add_request_handler(
            "resources/subscribe", SubscribeRequestParams, subscribe
        )

        @server.tool()
        async def touch() -> str:
            """Tell the sessions subscribed to the replica resource that it changed."""
            for session in subscribers:
                await session.send_resource_updated(REPLICA_URI)
            return f"touched {len(subscribers)}"

    def build_app(self) -> ASGIApp:
        server = self.build_server()
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        if self.legacy:
            app: ASGIApp = server.sse_app(
                sse_path=SSE_PATH, message_path=MESSAGE_PATH, transport_security=security
            )
        else:
            app = server.streamable_http_app(
                streamable_http_path=MCP_PATH,
                json_response=self.json_response,
                transport_security=security,
            )
        if self.modern_only:
            app = _modern_only(app)
        if self.handshake_only:
            app = _handshake_only(app)
        return self._recording(app)

    def _recording(self, app: ASGIApp) -> ASGIApp:
        async def recording_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            seen = SeenRequest(
                scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers
            )
            self.requests.append(seen)
            responses = 0

            async def recording_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    seen.body.extend(message.get("body", b""))
                return message

            async def recording_send(message: Message) -> None:
                nonlocal responses
                if message["type"] == "http.response.start":
                    responses += 1
                    for name, value in message.get("headers", ()):
                        if name.lower() == b"mcp-session-id" and responses == 1:
                            session = value.decode("latin-1")
                            if session not in self.sessions_created:
                                self.sessions_created.append(session)
                if responses > 1:
                    # The SDK's sse_app endpoint returns a Response() after its SSE stream
                    # ended: a second response on one request, which hypercorn would log
                    # as an "Error in ASGI Framework". Nobody is left to receive it.
                    return
                await send(message)

            await app(scope, recording_receive, recording_send)

        return recording_app

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 (``port``, or any free one) until cancelled; ``task_status``
        gets the port."""
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(partial(serve_asgi, self.build_app(), self.port))
            task_status.started(self.port)


def _modern_only(app: ASGIApp) -> ASGIApp:
    """``app`` refusing what is not a 2026-07-28 request, as a server that speaks only
    that revision does."""

    async def modern_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        version = dict(scope["headers"]).get(b"mcp-protocol-version", b"").decode("latin-1")
        if scope["method"] == "POST" and version == MODERN_VERSION:
            await app(scope, receive, send)
            return
        if scope["method"] == "POST":
            status = 400
            error = {
                "code": -32022,
                "message": "Unsupported protocol version",
                "data": {"supported": [MODERN_VERSION], "requested": version or None},
            }
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
        else:
            status, body = 405, b""
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"allow", b"POST")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return modern_app


def _handshake_only(app: ASGIApp) -> ASGIApp:
    """``app`` refusing 2026-07-28 requests, as a server that speaks only the handshake
    era does."""

    async def handshake_app(scope: Scope, receive: Receive, send: Send) -> None:
        version = dict(scope.get("headers", ())).get(b"mcp-protocol-version", b"")
        if scope["type"] != "http" or version.decode("latin-1") != MODERN_VERSION:
            await app(scope, receive, send)
            return
        error = {
            "code": -32022,
            "message": "Unsupported protocol version",
            "data": {"supported": [HANDSHAKE_VERSION], "requested": MODERN_VERSION},
        }
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return handshake_app


# -- MCP over plain HTTP ---------------------------------------------------------------------


def initialize_body(request_id: int = 0) -> dict[str, Any]:
    """A 2025-11-25 ``initialize`` request."""
    return handshake_request(
        request_id,
        "initialize",
        {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "switchboard-tests", "version": "0"},
        },
    )


def handshake_request(
    request_id: int | None, method: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A handshake-era JSON-RPC request (a notification when ``request_id`` is None)."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        body["id"] = request_id
    if params is not None:
        body["params"] = params
    return body


def modern_headers(method: str, name: str | None = None) -> list[tuple[str, str]]:
    """The HTTP headers of a 2026-07-28 POST of ``method`` (and ``name``, for Mcp-Name)."""
    headers = [
        ("Accept", MCP_ACCEPT),
        ("Content-Type", "application/json"),
        ("MCP-Protocol-Version", MODERN_VERSION),
        ("Mcp-Method", method),
    ]
    if name is not None:
        headers.append(("Mcp-Name", name))
    return headers


def modern_request(
    request_id: int, method: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A 2026-07-28 request: protocol version and client capabilities ride in
    ``params._meta``. Its HTTP headers must agree (MCP-Protocol-Version, Mcp-Method,
    Mcp-Name)."""
    full = dict(params or {})
    full["_meta"] = {
        _VERSION_META: MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        **full.get("_meta", {}),
    }
    return handshake_request(request_id, method, full)


def _sse_messages(body: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    data: list[str] = []
    for line in [*body.splitlines(), ""]:
        if not line:
            if data:
                messages.append(json.loads("\n".join(data)))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return messages


def rpc_response(content_type: str, body: bytes) -> dict[str, Any]:
    """The JSON-RPC response in an MCP POST's answer: the JSON body itself, or the first
    response (``result`` or ``error``) among the events of an SSE body."""
    text = body.decode("utf-8")
    if content_type.startswith("text/event-stream"):
        for message in _sse_messages(text):
            if "result" in message or "error" in message:
                return message
        raise ValueError(f"no JSON-RPC response in the event stream: {text!r}")
    message = json.loads(text)
    if not isinstance(message, dict):
        raise ValueError(f"not a JSON-RPC message: {text!r}")
    return message
