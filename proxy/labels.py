"""Bounded metric label values: what a client sends never becomes a new time series.

Clients choose HTTP methods, JSON-RPC methods and tool names, and backends choose status
codes; a label that copied them would let anyone grow ``/metrics`` without limit. Each
function here maps such a value onto a fixed set, folding everything outside it into
``OTHER``. Pure functions (and one small bounded set), no I/O.

The rule, per label:

- HTTP method: the nine methods of RFC 9110 / RFC 5789 (``HTTP_METHODS``), else ``other``.
- MCP method: the JSON-RPC methods of the MCP specification (``MCP_METHODS``) as
  themselves; any ``notifications/...`` as ``notification``; responses as ``response``;
  anything else ``other``.
- status: the codes of the IANA registry that Python knows (``http.HTTPStatus``) and 499
  (the client went away first), else ``other``.
- tool name: a valid MCP tool name (1-128 of ``A-Z a-z 0-9 _ - .``) that is configured or
  among the first ``TOOL_LABEL_LIMIT`` distinct names a worker has seen, else ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

OTHER = "other"
"""The one label value every unknown input folds into."""

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

MCP_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "roots/list",
        "sampling/createMessage",
        "elicitation/create",
        "tasks/get",
        "tasks/list",
        "tasks/cancel",
        "tasks/result",
    }
)

CLIENT_CLOSED = 499
"""Logged (nginx's convention) when the client went away before the response."""

TOOL_LABEL_LIMIT = 100
"""Distinct tool names a worker labels by name beyond the configured ones."""

_HTTP_BY_BYTES = {m.encode("ascii"): m for m in HTTP_METHODS}
_STATUS_TEXT = {int(s): str(int(s)) for s in HTTPStatus} | {CLIENT_CLOSED: str(CLIENT_CLOSED)}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

STATUS_LABELS = frozenset(_STATUS_TEXT.values()) | {OTHER}
"""Every value ``status_label`` can return."""
MCP_METHOD_LABELS = MCP_METHODS | {"notification", "response", OTHER}
"""Every value ``mcp_method_label`` can return."""
HTTP_METHOD_LABELS = HTTP_METHODS | {OTHER}
"""Every value ``http_method_label`` can return."""


def http_method_label(method: bytes | str) -> str:
    """The method if it is a standard one, else ``other``."""
    if isinstance(method, bytes):
        return _HTTP_BY_BYTES.get(method, OTHER)
    return method if method in HTTP_METHODS else OTHER


def mcp_method_label(method: str | None, *, is_response: bool = False) -> str:
    """A JSON-RPC message's method as a label (``response`` for responses and errors)."""
    if is_response:
        return "response"
    if method is None:
        return OTHER
    if method in MCP_METHODS:
        return method
    if method.startswith("notifications/"):
        return "notification"
    return OTHER


def status_label(status: int) -> str:
    """The status code as text if it is a registered one, else ``other``."""
    return _STATUS_TEXT.get(status, OTHER)


class ToolLabels:
    """The tool names one worker labels by name: those configured, plus the first
    ``limit`` distinct valid names it sees; every later new name is ``other``. So a
    worker contributes at most ``len(configured) + limit`` tool label values."""

    def __init__(self, configured: Iterable[str] = (), limit: int = TOOL_LABEL_LIMIT) -> None:
        self.limit = limit
        self._configured = frozenset(n for n in configured if _TOOL_NAME.fullmatch(n))
        self._seen: set[str] = set()

    def configure(self, names: Iterable[str]) -> None:
        """Replace the configured names (a new control-plane snapshot); names seen so far
        keep their labels, so a series never changes meaning."""
        self._configured = frozenset(n for n in names if _TOOL_NAME.fullmatch(n))

    def label(self, name: str | None) -> str:
        if name is None:
            return "none"
        if name in self._configured or name in self._seen:
            return name
        if len(self._seen) < self.limit and _TOOL_NAME.fullmatch(name):
            self._seen.add(name)
            return name
        return OTHER


def tool_label(name: str | None, tools: ToolLabels) -> str:
    """``name`` as a bounded label under ``tools``' rule; ``none`` when there is no tool."""
    return tools.label(name)
