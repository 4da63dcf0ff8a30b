"""Per-caller tool lists: a ``tools/list`` answer rewritten for a caller whose tools are
limited, so that it lists only the tools that caller may call; and a call of a tool so
hidden answered exactly as the backend answers a call of a tool it does not have.
Sans-IO.

The machine (``proxy.protocol.upstream_side``) holds such an answer until it is whole,
JSON or ``text/event-stream`` alike, and asks ``ToolListFilter.rewrite`` for the body the
caller gets. Only the JSON-RPC response to the caller's own request is decoded (with
msgspec) and written anew; every other byte (an SSE stream's other events, their
``id:`` and ``event:`` lines) goes as it came. A page of a paginated list is filtered
on its own: its ``nextCursor`` stays, so the client walks every page, each showing
only what it may call.

A hidden tool's call goes to the backend under a name no backend has (``HiddenToolCall``),
and the backend's answer comes back with the caller's name for it in place of that one:
whatever a backend says of an unknown tool (a JSON-RPC error, or a result with
``isError``), the caller gets the same for a hidden one, and cannot tell them apart.
The backend never runs the hidden tool.

A result that says ``cacheScope: public`` (2026-07-28) would let a shared cache hand
one caller's view to another: any list answered to a caller with an identity becomes
``private``, filtered or not (a caller allowed every tool sees what a limited one must
not).
"""

from __future__ import annotations

import secrets

import msgspec

MAX_FILTERED_ANSWER = 8 << 20
"""The largest ``tools/list`` answer held to be filtered; a larger one is refused (502)
rather than relayed unfiltered."""

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ToolListFilter:
    """The ``tools/list`` answer to one request, as one caller may see it."""

    __slots__ = ("allowed", "request_id")

    def __init__(self, allowed: frozenset[str] | None, request_id: int | str | None) -> None:
        self.allowed = allowed
        """The tools the caller may call; None: every tool (the list is left whole)."""
        self.request_id = request_id

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        """The answer the caller gets, or None where ``body`` needs no change."""
        if event_stream:
            return self._rewrite_stream(body)
        return self._rewrite_message(body)

    def _rewrite_message(self, payload: bytes) -> bytes | None:
        try:
            message = _decode(payload)
        except msgspec.DecodeError:
            return None  # not JSON: nothing that lists tools
        if not isinstance(message, dict) or message.get("id") != self.request_id:
            return None
        result = message.get("result")
        if not isinstance(result, dict):
            return None
        changed = False
        tools = result.get("tools")
        allowed = self.allowed
        if allowed is not None and isinstance(tools, list):
            kept = [t for t in tools if isinstance(t, dict) and t.get("name") in allowed]
            if len(kept) != len(tools):
                result["tools"] = kept
                changed = True
        if result.get("cacheScope") == "public":
            result["cacheScope"] = "private"
            changed = True
        return _encode(message) if changed else None

    def _rewrite_stream(self, body: bytes) -> bytes | None:
        """Each complete event of the stream in turn: the one whose data is the response
        to the request is rewritten, the others kept byte for byte."""
        out: list[bytes] = []
        block: list[bytes] = []
        changed = False
        lines = body.splitlines(keepends=True)
        last = len(lines) - 1
        for i, line in enumerate(lines):
            block.append(line)
            # A blank line ends an event. An unfinished last one is no event for a client
            # that follows the SSE rules, but a lax one may read it: it is filtered too.
            if line.strip(b"\r\n") and i != last:
                continue
            rewritten = self._rewrite_event(block)
            if rewritten is not None:
                changed = True
                out.append(rewritten)
            else:
                out.extend(block)
            block = []
        return b"".join(out) if changed else None

    def _rewrite_event(self, lines: list[bytes]) -> bytes | None:
        data = [line for line in lines if line.startswith(b"data:")]
        if not data:
            return None
        payload = b"\n".join(_field_value(line) for line in data)
        rewritten = self._rewrite_message(payload)
        if rewritten is None:
            return None
        # One data line in place of the first; JSON as msgspec writes it has no newline.
        ending = data[0][len(data[0].rstrip(b"\r\n")) :]
        out = []
        for line in lines:
            if line is data[0]:
                out.append(b"data: " + rewritten + ending)
            elif not line.startswith(b"data:"):
                out.append(line)
        return b"".join(out)


def _field_value(line: bytes) -> bytes:
    """The value of an SSE ``data:`` line: after the colon, one leading space dropped."""
    return line.rstrip(b"\r\n")[5:].removeprefix(b" ")


class HiddenToolCall:
    """A ``tools/call`` of a tool the caller may not see, sent under ``stand_in``."""

    __slots__ = ("_escaped", "body", "stand_in")

    def __init__(self, body: bytes, stand_in: str, name: str) -> None:
        self.body = body
        """The request body as the backend gets it."""
        self.stand_in = stand_in
        # The name as it stands inside a JSON string (the answer is JSON, or JSON in
        # SSE data lines, where an escaped name has no line break).
        self._escaped = _encode(name)[1:-1]

    def request_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers with its body's new length and, where the client sent
        one (2026-07-28), the stand-in as ``Mcp-Name``."""
        length = b"%d" % len(self.body)
        stand_in = self.stand_in.encode()
        return [
            (
                name,
                length if name == b"content-length" else stand_in if name == b"mcp-name" else value,
            )
            for name, value in headers
        ]

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        stand_in = self.stand_in.encode()
        return body.replace(stand_in, self._escaped) if stand_in in body else None


def hide_tool_call(body: bytes, name: str) -> HiddenToolCall | None:
    """The call in ``body`` (a JSON-RPC ``tools/call`` of ``name``) under a name no
    backend has; None where the body is not such a call."""
    try:
        message = _decode(body)
    except msgspec.DecodeError:
        return None
    params = message.get("params") if isinstance(message, dict) else None
    if not isinstance(params, dict) or params.get("name") != name:
        return None
    stand_in = "switchboard-hidden-" + secrets.token_hex(12)
    params["name"] = stand_in
    return HiddenToolCall(_encode(message), stand_in, name)
