"""A 2026-07-28 client's ``subscriptions/listen`` on a route whose backends speak only
2025-11-25 (``backend_era``). Sans-IO.

2026-07-28 has no standing GET stream: a client opts in to server events with a
``subscriptions/listen`` request whose answer is the stream. A 2025-11-25 server sends
them on its session's GET stream, and sends resource updates only for the URIs the
session subscribed to. So a listen gets an upstream session of its own (a 2025-11-25
session has at most one GET stream), opened by the worker with one
``resources/subscribe`` for each URI the listen names; its request goes upstream as the
session's ``GET``; the answer stream opens with the proxy's
``notifications/subscriptions/acknowledged`` and carries, of the backend's events, those
the listen asked for, each tagged with ``_meta["io.modelcontextprotocol/subscriptionId"]``
(the listen request's id); anything else on the GET stream (log messages, other
notifications, server-to-client requests) is left out, as a 2026-07-28 server never
sends what was not asked for. Closing the listen stream closes the upstream GET. No
replay: as on 2026-07-28, a dropped stream is re-listened.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from proxy.protocol.eras import SUBSCRIPTION_ID_META_KEY
from proxy.protocol.jsonrpc import INTERNAL_ERROR, RequestId, error_body
from proxy.protocol.mcp import METHOD_HEADER, NAME_HEADER
from proxy.protocol.sse import DROP_EVENT, rewrite_events
from proxy.protocol.upstream_sessions import ModernAnswer, SessionKey, UpstreamSession

LIST_CHANGED: Final = {
    "notifications/tools/list_changed": "toolsListChanged",
    "notifications/prompts/list_changed": "promptsListChanged",
    "notifications/resources/list_changed": "resourcesListChanged",
}
"""The list-changed notifications and the filter flag that asks for each."""
RESOURCE_UPDATED: Final = "notifications/resources/updated"
ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"
SUBSCRIBE_ID_PREFIX: Final = "switchboard-subscribe-"

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ListenAnswer(ModernAnswer):
    """A listen's upstream GET, and its events as the 2026-07-28 client gets them."""

    __slots__ = ("filter", "uris")

    upstream_method: bytes | None = b"GET"

    def __init__(self, message: dict[str, Any], request_id: RequestId | None) -> None:
        super().__init__(message, request_id, "subscriptions/listen")
        params = message.get("params")
        wanted = params.get("notifications") if isinstance(params, dict) else None
        wanted = wanted if isinstance(wanted, dict) else {}
        uris = wanted.get("resourceSubscriptions")
        self.uris = tuple(u for u in uris if isinstance(u, str)) if isinstance(uris, list) else ()
        self.filter: dict[str, Any] = {k: True for k in LIST_CHANGED.values() if wanted.get(k)}
        """What the listen asked for, and what the proxy acknowledges."""
        if self.uris:
            self.filter["resourceSubscriptions"] = list(self.uris)
        self.dropped_headers = frozenset(
            {METHOD_HEADER, NAME_HEADER, b"content-type", b"content-length", b"accept"}
        )

    def subscribe_bodies(self) -> tuple[bytes, ...]:
        """The ``resources/subscribe`` requests the listen's session makes."""
        return tuple(
            _encode(
                {
                    "jsonrpc": "2.0",
                    "id": f"{SUBSCRIBE_ID_PREFIX}{i}",
                    "method": "resources/subscribe",
                    "params": {"uri": uri},
                }
            )
            for i, uri in enumerate(self.uris)
        )

    def within(self, key: SessionKey, session: UpstreamSession, target: bytes = b"") -> bytes:
        """The session's GET: the session's headers and a stream's, no body."""
        super().within(key, session, target)
        self.request_headers += ((b"accept", b"text/event-stream"),)
        return b""

    def cancellation(self) -> bytes | None:
        return None  # closing the GET is all there is to end

    def stream_prelude(self) -> bytes:
        return b"event: message\ndata: %s\n\n" % self._tagged(
            {"jsonrpc": "2.0", "method": ACKNOWLEDGED, "params": {"notifications": self.filter}}
        )

    def holds(self, status: int, *, event_stream: bool) -> bool:
        return not event_stream

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        """A held answer: a stream that ended at once, or the backend refusing the GET."""
        self.json_instead = not event_stream
        if event_stream:
            events = self.rewrite_relayed(body)
            return self.stream_prelude() + (body if events is None else events)
        message = f"the backend offers no stream for subscriptions: {body[:200]!r}"
        return error_body(self.request_id, INTERNAL_ERROR, message)

    def answer_status(self, status: int) -> int:
        return 502 if self.json_instead else status

    def rewrite_relayed(self, events: bytes) -> bytes | None:
        return rewrite_events(events, self._listen_event)

    def _listen_event(self, payload: bytes) -> bytes | None:
        try:
            message = _decode(payload)
        except msgspec.DecodeError:
            return DROP_EVENT
        if not isinstance(message, dict):
            return DROP_EVENT
        method = message.get("method")
        params = message.get("params")
        if method in LIST_CHANGED:
            wanted = self.filter.get(LIST_CHANGED[method], False)
        elif method == RESOURCE_UPDATED:
            wanted = isinstance(params, dict) and params.get("uri") in self.uris
        else:
            wanted = False
        return self._tagged(message) if wanted and "id" not in message else DROP_EVENT

    def _tagged(self, message: dict[str, Any]) -> bytes:
        params = message.get("params")
        if not isinstance(params, dict):
            params = message["params"] = {}
        meta = params.get("_meta")
        if not isinstance(meta, dict):
            meta = params["_meta"] = {}
        meta[SUBSCRIPTION_ID_META_KEY] = self.request_id
        return _encode(message)
