"""Per-caller tool lists: a ``tools/list`` answer rewritten for a caller whose tools are
limited, so that it lists only the tools that caller may call; and a call of a tool so
hidden answered exactly as the backend answers a call of a tool it does not have.
Sans-IO.

``CallerView.of`` looks at a request (one message, or a 2025-03-26 batch) from a caller
with an identity, and says what its answer needs: the ids of its ``tools/list``
requests, whose results are filtered, and the calls of hidden tools, which go to the
backend under stand-in names. The machine (``proxy.protocol.upstream_side``) then holds
the answer until it is whole, JSON or ``text/event-stream`` alike, and asks ``rewrite``
for the body the caller gets.

- Only the JSON-RPC responses to the caller's ``tools/list`` requests are decoded (with
  msgspec) and written anew; every other byte (an SSE stream's other events, their
  ``id:`` and ``event:`` lines, a batch's other responses) goes as it came. A page of a
  paginated list is filtered on its own: its ``nextCursor`` stays, so the client walks
  every page, each showing only what it may call.
- A result that says ``cacheScope: public`` (2026-07-28) would let a shared cache hand
  one caller's view to another: any list answered to a caller with an identity becomes
  ``private``, filtered or not (a caller allowed every tool sees what a limited one
  must not).
- A hidden tool's call goes to the backend under a name no backend has, and the
  backend's answer comes back with the caller's name for it in place of that one:
  whatever a backend says of an unknown tool (a JSON-RPC error, or a result with
  ``isError``), the caller gets the same for a hidden one, and cannot tell them apart.
  The backend never runs the hidden tool.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from proxy.protocol.jsonrpc import Envelope
from proxy.protocol.sse import rewrite_events

MAX_FILTERED_ANSWER = 8 << 20
"""The largest answer held to be rewritten; a larger one is refused (502) rather than
relayed unfiltered."""

STAND_IN_PREFIX = "switchboard-hidden-"

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class CallerView:
    """What a caller's answer to one request must become before it goes out."""

    __slots__ = ("_renames", "body", "list_ids", "visible")

    def __init__(
        self,
        visible: Callable[[object], bool] | None,
        list_ids: frozenset[int | str] = frozenset(),
        renames: tuple[tuple[bytes, bytes], ...] = (),
        body: bytes | None = None,
    ) -> None:
        self.visible = visible
        """Whether a listed tool's name is one the caller may see; None: every tool
        (lists are left whole)."""
        self.list_ids = list_ids
        """The ids of the request's ``tools/list`` requests."""
        self._renames = renames
        """(stand-in, the hidden name as it stands inside a JSON string) pairs."""
        self.body = body
        """The request body as the backend gets it, where stand-ins changed it."""

    @classmethod
    def of(
        cls,
        messages: tuple[Envelope, ...],
        body: bytes,
        visible: Callable[[object], bool] | None,
        hidden: set[str],
    ) -> CallerView | None:
        """The view for a request whose messages are ``messages`` (its ``body`` whole)
        and whose ``tools/call`` of the tools in ``hidden`` the caller may not make;
        None where its answer goes as it comes."""
        list_ids = frozenset(
            m.id for m in messages if m.method == "tools/list" and m.id is not None
        )
        renames: tuple[tuple[bytes, bytes], ...] = ()
        sent = None
        if hidden:
            sent, stand_ins = _hide_calls(body, hidden)
            renames = tuple(
                (stand_in.encode(), _encode(name)[1:-1]) for name, stand_in in stand_ins.items()
            )
        if not list_ids and not renames:
            return None
        return cls(visible, list_ids, renames, sent)

    def holds(self, status: int, *, event_stream: bool) -> bool:
        """Whether an answer is held until whole, to be rewritten: a successful one, and
        any answer to calls of hidden tools (their stand-ins are named in it)."""
        return status == 200 or bool(self._renames)

    def answer_status(self, status: int) -> int:
        return status

    def answer_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ()

    def answer_content_type(self) -> bytes | None:
        return None

    def stand_in(self) -> bytes | None:
        """The stand-in of a single hidden call, for its ``Mcp-Name`` header."""
        return self._renames[0][0] if len(self._renames) == 1 else None

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        """The answer the caller gets, or None where ``body`` needs no change."""
        out = body
        if self.list_ids:
            filtered = (
                rewrite_events(body, self._rewrite_message)
                if event_stream
                else self._rewrite_message(body)
            )
            if filtered is not None:
                out = filtered
        for stand_in, escaped in self._renames:
            if stand_in in out:
                out = out.replace(stand_in, escaped)
        return None if out is body else out

    def _rewrite_message(self, payload: bytes) -> bytes | None:
        try:
            message = _decode(payload)
        except msgspec.DecodeError:
            return None  # not JSON: nothing that lists tools
        if isinstance(message, list):  # a batch's answers
            changed = [self._filter(m) for m in message]
            return _encode(message) if any(changed) else None
        return _encode(message) if self._filter(message) else None

    def _filter(self, message: Any) -> bool:
        """Filter ``message`` in place if it is the result of one of the lists."""
        if not isinstance(message, dict):
            return False
        request_id = message.get("id")
        result = message.get("result")
        if (
            not isinstance(request_id, int | str)
            or request_id not in self.list_ids
            or not isinstance(result, dict)
        ):
            return False
        changed = False
        tools = result.get("tools")
        visible = self.visible
        if visible is not None and isinstance(tools, list):
            kept = [t for t in tools if isinstance(t, dict) and visible(t.get("name"))]
            if len(kept) != len(tools):
                result["tools"] = kept
                changed = True
        if result.get("cacheScope") == "public":
            result["cacheScope"] = "private"
            changed = True
        return changed


def _hide_calls(body: bytes, hidden: set[str]) -> tuple[bytes, dict[str, str]]:
    """``body`` (a message or a batch) with the ``tools/call`` of each tool in ``hidden``
    under a stand-in name; and the stand-in of each name."""
    decoded = _decode(body)
    stand_ins: dict[str, str] = {}
    for message in decoded if isinstance(decoded, list) else [decoded]:
        params = message.get("params") if isinstance(message, dict) else None
        if message.get("method") != "tools/call" or not isinstance(params, dict):
            continue
        name = params.get("name")
        if isinstance(name, str) and name in hidden:
            stand_in = stand_ins.get(name)
            if stand_in is None:
                stand_in = stand_ins[name] = STAND_IN_PREFIX + secrets.token_hex(12)
            params["name"] = stand_in
    return _encode(decoded), stand_ins
