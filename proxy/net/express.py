"""The express lane: ordinary requests on plain routes, parsed by llhttp instead of h11.

Most traffic through a reverse proxy is the same few shapes: an HTTP/1.1 request with no
body or a small one already in hand, answered with a Content-Length or chunked body.
For those, h11's pure-Python parsing and state machine on both sides is most of what the
proxy spends. This lane parses the request head with ``proxy.protocol.fast_head``
(proven by differential tests to accept exactly what h11 plus ``inspect_request``
accept, and to fall back on anything unusual) and the response with
``proxy.protocol.fast_response``, and writes both heads itself.

A request takes the lane only when nothing about it needs the full path (``eligible``):
an ``http`` route without authentication or rate limits, a method other than HEAD or
CONNECT, no upgrade, no chunked upload, a body of at most 64 KiB (waited for when the
head came alone), and no ``Accept: text/event-stream`` (streams need the full path's
drain and disconnect handling). Anything
else — and every request that gets a refusal of its own — goes to the h11 path, which
stays the reference. Once the request is sent upstream, the lane sees it through: errors
get the same statuses as on the h11 path (502, 504), and a response the lane cannot
relay (an upgrade nobody asked for, an unknown transfer coding) is a 502.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from proxy.net.errors import CLOSED, RECV_SIZE, BackendFailed, ClientGone, write_now
from proxy.net.exchange import Exchange
from proxy.net.upstream import UpstreamConnection, UpstreamPool, UpstreamUnavailable
from proxy.protocol.fast_head import FastHead
from proxy.protocol.fast_response import END, Malformed, ResponseHead, ResponseReader, Unsupported
from proxy.protocol.http1 import (
    downstream_response_headers,
    is_event_stream,
    raw_error_response,
    reason_phrase,
)
from proxy.routing import Route

if TYPE_CHECKING:
    from proxy.net.http_conn import ClientConnection


MAX_WAITED_BODY = 65536
"""The largest body the lane waits for when its head came alone (clients often write
head and body separately); larger ones take the h11 path, which streams them."""


def eligible(client: ClientConnection, head: FastHead, route: Route | None) -> bool:
    """Whether the lane may serve this request, once its whole body is in hand."""
    if route is None or route.kind != "http":
        return False
    ctx = client.ctx
    if ctx.auth_required(route) or (ctx.control is not None and ctx.control.rate_limited):
        return False
    info = head.info
    if info.chunked or info.upgrade is not None or head.method in (b"HEAD", b"CONNECT"):
        return False
    length = info.content_length or 0
    limit = ctx.config.limits.max_body_bytes
    if length > MAX_WAITED_BODY or (limit and length > limit):
        return False
    # An event stream needs the h11 path's stream handling (ends at an event boundary
    # on drain, notices a client that left while the backend is silent).
    return not any(
        name == b"accept" and b"text/event-stream" in value for name, value in head.headers
    )


def _serialize_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    lines.append(b"\r\n")
    return b"".join(lines)


async def serve(
    client: ClientConnection, head: FastHead, route: Route, body: bytes, x: Exchange
) -> bool:
    """Proxy one request whose whole ``body`` is in hand; True if the client connection
    may carry another request."""
    ctx = client.ctx
    x.route = route
    x.express = True
    info = head.info
    x.bytes_in = len(body)
    backend = ctx.choose_backend(route)
    if backend is None:
        return await _refuse(client, x, 503, "no healthy backend for this route")
    pool = ctx.pools[backend]
    headers = x.use_backend(backend, route, head, info)
    x.upstream_target = route.upstream_target(backend, info.target)
    lines = [b"%s %s HTTP/1.1\r\n" % (head.method, x.upstream_target)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    lines.append(b"\r\n")
    lines.append(body)
    request = b"".join(lines)
    try:
        up = await _send_request(pool, request)
    except (UpstreamUnavailable, BackendFailed) as exc:
        pool.record(False)
        return await _refuse(client, x, exc.status, exc.reason)
    x.upload_complete = True
    try:
        close = b"close" in info.connection_tokens
        reusable, keep_client = await _relay_response(client, x, up, route, close)
    except BaseException:
        await pool.discard(up)
        raise
    if x.response_started:
        pool.record(x.status < 500)
    if reusable:
        await pool.release(up, express=True)
    else:
        await pool.discard(up)
        if x.error is not None and not x.client_gone:
            pool.count_failure("timeout" if x.status == 504 else "error")
    if x.error is not None and not x.response_started and not x.client_gone:
        return await _refuse(client, x, x.status, x.error)
    return keep_client and x.response_complete and not ctx.draining


async def _send_request(pool: UpstreamPool, request: bytes) -> UpstreamConnection:
    """Send the whole request; a reused connection found dead is retried once on a fresh
    one (nothing was lost: the request is all here)."""
    for attempt in (1, 2):
        up = await pool.acquire()
        try:
            written = write_now(up.stream, request)
            if written < len(request):
                await up.stream.send_all(memoryview(request)[written:])
        except CLOSED:
            await pool.discard(up)
            pool.count_failure("error")
            if up.reused and attempt == 1:
                continue
            raise BackendFailed(502, "backend closed the connection") from None
        except BaseException:
            await pool.discard(up)
            raise
        return up
    raise AssertionError("unreachable")


async def _relay_response(
    client: ClientConnection, x: Exchange, up: UpstreamConnection, route: Route, close: bool
) -> tuple[bool, bool]:
    """Relay the backend's answer; (backend connection reusable, client may go on)."""
    ctx = client.ctx
    upstream = ctx.config.upstream
    reader = ResponseReader()
    timeout = upstream.response_timeout
    while not reader.complete:
        data: bytes | None = None
        with trio.move_on_after(timeout):
            try:
                data = await up.stream.receive_some(RECV_SIZE)
            except CLOSED:
                data = b""
        if data is None:
            if not x.response_started:
                x.fail(504, "backend did not answer in time")
                return False, False
            x.error = "backend went silent mid-response"
            raise ClientGone  # the client's copy cannot be completed: close it
        try:
            events = reader.feed(data)
        except (Malformed, Unsupported) as exc:
            if x.response_started:
                x.error = f"backend response unusable: {exc}"
                raise ClientGone from None
            x.fail(502, f"backend response unusable: {exc}")
            return False, False
        out: list[bytes] = []
        for event in events:
            if isinstance(event, ResponseHead):
                close |= _start_response(x, event, route, out, client, close)
                if reader.final:
                    timeout = upstream.read_timeout
                    if x.streamed and upstream.stream_idle_timeout:
                        timeout = upstream.stream_idle_timeout
            elif event is not END:
                x.bytes_out += len(event)
                out.append(event)
        if out:
            await client.send(b"".join(out))
    x.response_complete = x.upstream_complete = True
    return reader.keep_alive and not ctx.draining, not close


def _start_response(
    x: Exchange,
    head: ResponseHead,
    route: Route,
    out: list[bytes],
    client: ClientConnection,
    close: bool,
) -> bool:
    """Append the client's copy of a response head; True if the client connection must
    close after this response."""
    ctx = client.ctx
    close = close or head.until_close or ctx.draining
    final = head.status >= 200
    headers = downstream_response_headers(
        head.headers, head.http_version, ctx.policy_for(route), close=close and final
    )
    if head.chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    if final:
        x.status = head.status
        x.response_started = True
        x.streamed = is_event_stream(head.headers)
    out.append(_serialize_head(head.status, reason_phrase(head.status, head.reason), headers))
    return close


async def _refuse(client: ClientConnection, x: Exchange, status: int, reason: str) -> bool:
    """Answer the request ourselves and close, as the h11 path's refusals do."""
    x.status = status
    x.error = reason
    x.refused = True
    extra: list[tuple[bytes, bytes]] = []
    if status == 503:
        extra.append((b"retry-after", str(client.ctx.config.server.retry_after_seconds).encode()))
    try:
        await client.send(raw_error_response(status, reason, extra=extra))
    except ClientGone:
        return False
    from proxy.net.http_conn import linger_close

    await linger_close(client.stream)
    return False
