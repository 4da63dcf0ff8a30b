"""The routing half of the connection machine's request side
(``proxy.protocol.request_side``): with what is needed of the body in hand, an MCP
message is classified and routed (``proxy.mcp_routing``), then a backend is chosen and
the request head it gets is written; plus the MCP changes to response heads. Sans-IO.
"""

from __future__ import annotations

import time

from mypy_extensions import mypyc_attr

from proxy.auth import Identity, ToolDenied, check_tool_allowed, strip_credentials
from proxy.mcp_routing import (
    SESSION_NOT_FOUND,
    McpDecision,
    McpRefusal,
    check_origin,
    decide,
    with_session,
)
from proxy.oauth import insufficient_scope
from proxy.protocol import answers
from proxy.protocol.eras import (
    Translation,
)
from proxy.protocol.exchange import Exchange
from proxy.protocol.http1 import upstream_request_headers
from proxy.protocol.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST
from proxy.protocol.mcp import SESSION_HEADER, VERSION_HEADER
from proxy.protocol.request_side import MCP_RATE_STEP
from proxy.protocol.tool_lists import CallerView
from proxy.protocol.trace_context import (
    TRACEPARENT,
    TRACESTATE,
    start_trace,
    with_meta_traceparent,
)
from proxy.protocol.translating_side import TranslatingSide
from proxy.routing import Backend, Route

_RETRY_LATER = ((b"retry-after", b"1"),)


@mypyc_attr(allow_interpreted_subclasses=True)
class RoutingSide(TranslatingSide):
    __slots__ = ()

    def _after_body(self, *, streaming: bool = False) -> None:
        """What is needed of the body is in hand: route MCP messages, then choose."""
        x = self.x
        assert x is not None and x.route is not None and self.head is not None
        if streaming:
            self.uploading = True
        if x.route.kind != "mcp":
            self._choose_backend()
            return
        head = self.head
        try:
            check_origin(head.mcp_headers, x.route.allowed_origins, head.info.host)
            decision = decide(
                head.method,
                head.info.target,
                head.mcp_headers,
                b"".join(self.held) if head.method == b"POST" else None,
                self._tokens(),
            )
        except McpRefusal as exc:
            self._refuse(exc.status, exc.message, rpc=exc)
            return
        x.mcp = decision
        identity = x.identity
        if identity is not None and self._apply_caller_view(identity, decision):
            return
        if (
            x.route.backend_era != "any" or decision.session_state is not None
        ) and self._translated_here(decision):
            return
        self._mcp_rate_limit()

    def _apply_caller_view(self, identity: Identity, decision: McpDecision) -> bool:
        """Per-caller tool lists (``proxy.protocol.tool_lists``): note how the answer is
        rewritten, and send hidden tools' calls under stand-in names. True when the
        request was answered here instead (a call that names no tool, from a caller
        limited to some)."""
        x = self.x
        assert x is not None
        envelope = decision.envelope
        messages = decision.batch if envelope is None else (envelope,)
        calls = [m for m in messages if m.method == "tools/call"]
        oauth = x.route.oauth if x.route is not None else None
        if oauth is not None:
            for call in calls:
                needed = oauth.tool_scope_missing(identity, call.name)
                if needed is not None:
                    # The client may ask for more (step-up): the scope is named.
                    self._refuse_auth(
                        insufficient_scope(oauth, (needed,), f"tool needs scope {needed}")
                    )
                    return True
        denied = [d for d in (check_tool_allowed(identity, m.name) for m in calls) if d]
        hidden = {d.tool for d in denied if d.tool is not None}
        if denied:
            self.env.tool_denied()
            if any(d.tool is None for d in denied) or not self.request_done:
                refusal = denied[0] if len(denied) == 1 else ToolDenied(None)
                self._answer_in_band(200, refusal.body(decision.request_id), refusal.message)
                return True
        if not hidden and not any(m.method == "tools/list" for m in messages):
            return False
        visible = None
        if identity.allowed_tools is not None or (oauth is not None and oauth.tool_scopes):

            def visible(name: object) -> bool:
                return (
                    isinstance(name, str)
                    and check_tool_allowed(identity, name) is None
                    and (oauth is None or oauth.tool_scope_missing(identity, name) is None)
                )

        view = CallerView.of(messages, b"".join(self.held), visible, hidden)
        if view is not None and view.body is not None:
            self._rewrite_body(view.body)  # the backend answers as for tools it lacks
        x.answer_rewrite = view
        return False

    def _mcp_rate_limit(self) -> None:
        x = self.x
        assert x is not None and x.mcp is not None
        tool = x.mcp.name if x.mcp.method == "tools/call" else None
        check = self.env.rate_check(self.peer[0], x.identity, tool)
        if check is not None:
            self._wait(MCP_RATE_STEP, check)
            return
        self._choose_backend()

    def _answer_in_band(self, status: int, body: bytes, reason: str) -> None:
        """A JSON-RPC error answered with 200 (what the protocol expects for an
        authorization refusal of a call): the connection stays usable."""
        self._answer_here(status, body, reason)

    # -- choosing a backend ---------------------------------------------------------------

    def _choose_backend(self) -> None:
        x = self.x
        assert x is not None and x.route is not None and self.head is not None
        decision = x.mcp
        backend = self.env.choose_backend(x.route, decision.replica if decision else None)
        if backend is None:
            self._no_backend()
            return
        x.backend = backend
        if x.answer_rewrite is not None and self._waits_for_session(backend):
            return
        ratio = self.env.trace_ratio
        if ratio and x.trace is None:
            self._start_trace(x, ratio)
        held = b""
        if self.held:
            body = self.body
            # Without a reader the whole Content-Length body came with the head.
            held = (
                self.held[0] if body is None else body.upstream(self.held, ending=self.request_done)
            )
            self.held = []
        self._send_upstream_request(self.upstream_request(x.route, backend), held)

    def _start_trace(self, x: Exchange, ratio: float) -> None:
        """Decide whether the request is traced (``proxy.protocol.trace_context``)."""
        head = self.head
        assert head is not None
        headers = dict(head.headers)  # in C: a loop over them costs more than the rest
        decision = x.mcp
        envelope = decision.envelope if decision is not None else None
        meta = envelope.traceparent if envelope is not None else None
        trace = start_trace(headers.get(TRACEPARENT), headers.get(TRACESTATE), meta, ratio)
        if trace is None:
            return
        x.trace = trace
        trace.session_id = headers.get(SESSION_HEADER, b"").decode("latin-1")
        trace.protocol_version = headers.get(VERSION_HEADER, b"").decode("latin-1") or (
            envelope.protocol_version or "" if envelope is not None else ""
        )
        if meta is not None and self.request_done and self.held:
            body = with_meta_traceparent(b"".join(self.held), trace.reserve())
            if body is not None:
                self._rewrite_body(body)

    def _no_backend(self) -> None:
        x = self.x
        assert x is not None
        decision = x.mcp
        if decision is None:
            self._refuse(503, "no healthy backend for this route")
            return
        if decision.replica is not None and decision.translated_to is None:
            # The session's replica is gone or out of rotation: the client must start a
            # new session, which the spec signals with 404.
            refusal = McpRefusal(404, INVALID_REQUEST, SESSION_NOT_FOUND, decision.request_id)
        else:
            refusal = McpRefusal(
                503,
                INTERNAL_ERROR,
                "No healthy backend for this route",
                decision.request_id,
                headers=_RETRY_LATER,
            )
        self._refuse(refusal.status, refusal.message, rpc=refusal)

    def upstream_request(self, route: Route, backend: Backend) -> bytes:
        """The request head as ``backend`` gets it."""
        x = self.x
        head = self.head
        assert x is not None and head is not None
        policy = self.env.policy_for(route)
        info = head.info
        decision = x.mcp
        target = route.upstream_target(
            backend, info.target if decision is None or not decision.target else decision.target
        )
        plain = head.plain
        if (
            plain is not None
            and x.answer_rewrite is None
            and x.trace is None
            and route.oauth is None
            and policy.host_mode == "preserve"
            and (x.identity is None or route.forward_credentials)
            and (decision is None or decision.backend_session is None)
        ):
            # Nothing in the header lines is rewritten or removed: they go as they came,
            # followed by what upstream_request_headers would add.
            return b"%s %s HTTP/1.1\r\n%bx-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n%b" % (
                head.method,
                target,
                plain,
                self.peer_ip,
                policy.proto,
                b"x-forwarded-host: %s\r\nvia: 1.1 %s\r\n\r\n" % (info.host, policy.via),
            )
        oauth = route.oauth
        told = oauth.caller_headers if oauth is not None else ()
        headers = upstream_request_headers(
            head,
            head.info,
            policy,
            client_ip=self.peer[0],
            backend_authority=backend.authority,
        )
        if x.identity is not None and not route.forward_credentials:
            headers = strip_credentials(headers, False, self.env.auth_header())
        if decision is not None and decision.backend_session is not None:
            with_session(headers, decision.backend_session)
        length = self.rewritten_length
        answer: object = x.answer_rewrite
        translation = answer if isinstance(answer, Translation) else None
        if translation is not None:
            # The MCP headers of the backend's era in place of the client's, and the
            # rewritten body's length, in one pass.
            replaced = translation.dropped_headers.union(n for n, _ in translation.request_headers)
            size = b"%d" % length if length is not None else None
            headers = [
                (n, size if size is not None and n == b"content-length" else v)
                for n, v in headers
                if n not in replaced
            ]
            headers.extend(translation.request_headers)
        elif length is not None:
            # A body the proxy rewrote: its length, and a hidden call's stand-in name.
            view = x.answer_rewrite
            stand_in = view.stand_in() if view is not None else None
            headers = [
                (
                    n,
                    b"%d" % length
                    if n == b"content-length"
                    else stand_in
                    if n == b"mcp-name" and stand_in is not None
                    else v,
                )
                for n, v in headers
            ]
        trace = x.trace
        if trace is not None:
            # The backend's parent is this attempt's span; the client's own is replaced.
            headers = [(n, v) for n, v in headers if n != TRACEPARENT and n != TRACESTATE]
            headers.append((TRACEPARENT, trace.attempt(backend, time.perf_counter())))
            if trace.tracestate:
                headers.append((TRACESTATE, trace.tracestate))
        if told and oauth is not None:
            # Set by the proxy alone: a client's own copies never reach the backend.
            names = {name for _, name in told}
            headers = [(n, v) for n, v in headers if n not in names]
            if x.identity is not None:
                headers += oauth.caller_header_values(x.identity)
        method = translation.upstream_method if translation is not None else None
        return answers.request_head(method or head.method, target, headers)

    def mcp_response_headers(self, headers: list[tuple[bytes, bytes]], *, streaming: bool) -> None:
        """MCP response header changes: the backend's session id becomes the proxy's
        token, and streams ask intermediaries not to buffer them."""
        x = self.x
        assert x is not None
        decision = x.mcp
        tokens = self.env.tokens
        if decision is not None and decision.issue_session and tokens is not None:
            for i, (name, value) in enumerate(headers):
                if name == SESSION_HEADER:
                    assert x.backend is not None
                    token = tokens.issue(x.backend.replica, value.decode("latin-1"))
                    headers[i] = (name, token.encode("ascii"))
        if streaming and not any(name == b"x-accel-buffering" for name, _ in headers):
            headers.append((b"x-accel-buffering", b"no"))
