"""Bytes the proxy writes itself: request heads for backends, response heads for clients,
and the answers it gives on its own behalf. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from proxy.protocol.http1 import reason_phrase

Headers = Sequence[tuple[bytes, bytes]]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """An HTTP/1.1 request head."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """An HTTP/1.1 response head (the standard reason phrase when ``reason`` is empty)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status, reason))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def text_error(
    status: int, detail: str, extra: Headers = (), *, retry_after: int = 0, close: bool = True
) -> bytes:
    """A small text/plain answer on the proxy's own behalf: ``<status> <phrase>: <detail>``.
    A 503 without its own Retry-After gets one of ``retry_after`` seconds."""
    body = f"{status} {HTTPStatus(status).phrase}: {detail}\n".encode()
    return _answer(status, b"text/plain; charset=utf-8", body, extra, retry_after, close)


def json_answer(
    status: int, body: bytes, extra: Headers = (), *, retry_after: int = 0, close: bool = True
) -> bytes:
    """A JSON answer (a JSON-RPC error, on MCP routes)."""
    return _answer(status, b"application/json", body, extra, retry_after, close)


def _answer(
    status: int, content_type: bytes, body: bytes, extra: Headers, retry_after: int, close: bool
) -> bytes:
    headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        *extra,
    ]
    if status == 503 and retry_after and not any(name == b"retry-after" for name, _ in extra):
        headers.append((b"retry-after", b"%d" % retry_after))
    if close:
        headers.append((b"connection", b"close"))
    return response_head(status, b"", headers) + body
