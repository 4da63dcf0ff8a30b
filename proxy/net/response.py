"""The response half of an exchange: backend response head and body to the client.

Every batch of h11 events one receive from the backend produced is written to the client
in one ``send_all`` before the next receive, so nothing waits in the proxy: an SSE event
goes out as soon as it arrives. ``read_timeout`` (``stream_idle_timeout`` for
``text/event-stream``) bounds silence inside the body.

On a drain, an SSE stream is ended at the next event boundary with a ``retry:`` hint
(``proxy.protocol.sse``), so the client reconnects (to another worker or host) and
resumes; a WebSocket tunnel is closed with 1001 (``proxy.net.relay``).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import h11
import trio

from proxy.net.errors import CLOSED, RECV_SIZE, BackendFailed, ClientGone, StreamParked
from proxy.net.event_stream import EventStreamRelay, mcp_response_headers
from proxy.net.relay import Tunnel
from proxy.net.upstream import UpstreamConnection
from proxy.protocol.http1 import downstream_response_headers, is_event_stream, reason_phrase

if TYPE_CHECKING:
    from proxy.net.exchange import Exchange


async def first_upstream_event(up: UpstreamConnection, response_timeout: float) -> h11.Event:
    """Wait for the next response head (or informational response), at most
    ``response_timeout`` seconds."""
    with trio.move_on_after(response_timeout):
        try:
            while True:
                event = up.h11.next_event()
                if event is not h11.NEED_DATA:
                    assert not isinstance(event, type)
                    return event
                data = await up.stream.receive_some(RECV_SIZE)
                if not data and up.reused and up.h11.their_state is h11.SEND_RESPONSE:
                    raise BackendFailed(502, "backend closed the connection", retryable=True)
                up.h11.receive_data(data)
        except h11.RemoteProtocolError as exc:
            raise BackendFailed(502, f"invalid response from backend: {exc}") from None
        except (*CLOSED, OSError):
            raise BackendFailed(502, "backend reset the connection", retryable=up.reused) from None
    raise BackendFailed(504, "backend response timeout")


async def respond(
    x: Exchange, up: UpstreamConnection, event: h11.Event | type[h11.NEED_DATA]
) -> None:
    """Relay the response; failures are recorded on ``x``, never raised. Raises
    StreamParked when an event stream was parked (``resume_relay`` carries it on)."""
    await _recorded(x, _relay(x, up, event))


Relay = EventStreamRelay | Tunnel
"""What a parked stream carries on with: an SSE relay or a WebSocket tunnel."""


async def resume_relay(x: Exchange, relay: Relay) -> None:
    """``respond`` for a parked stream that woke: the rest of its relay."""
    await _recorded(x, _stream_on(x, relay))


async def _recorded(x: Exchange, relaying: Coroutine[Any, Any, None]) -> None:
    try:
        await relaying
    except BackendFailed as exc:
        x.fail(exc.status, exc.reason)
    except ClientGone:
        x.client_gone = True
        x.fail(499, "client closed the connection")


async def _stream_on(x: Exchange, relay: Relay, starting_as: str | None = None) -> None:
    """Relay a stream from its start, the connection counting as ``starting_as`` (sse,
    websocket) until the stream ends, parked spells included; or, without it, on from
    where the stream was parked."""
    parked = False
    try:
        if starting_as is not None:
            x.client.enter_kind(starting_as)
            x.request = None  # what is left to do needs only the request line
            await relay.start()
        else:
            await relay.resume()
    except StreamParked:
        parked = True
        raise
    finally:
        if not parked:
            x.client.leave_kind()


async def _relay(
    x: Exchange, up: UpstreamConnection, event: h11.Event | type[h11.NEED_DATA]
) -> None:
    client = x.client
    conn = client.conn
    ctx = client.ctx
    response_timeout = ctx.config.upstream.response_timeout
    if event is h11.NEED_DATA:
        event = await first_upstream_event(up, response_timeout)
    while type(event) is h11.InformationalResponse:
        if event.status_code == 101:
            await _switch_protocols(x, up, event)
            return
        if event.status_code == 100 and conn.client_is_waiting_for_100_continue:
            await client.send(conn.send(event) or b"")
        event = await first_upstream_event(up, response_timeout)
    if type(event) is not h11.Response:
        raise BackendFailed(502, "backend closed the connection without a response")
    headers = downstream_response_headers(
        event.headers, event.http_version, ctx.policy_for(x.route), close=ctx.draining
    )
    streaming = is_event_stream(event.headers)
    if x.mcp is not None:
        mcp_response_headers(x, headers, streaming=streaming)
    x.status = event.status_code
    head = conn.send(
        h11.Response(
            status_code=event.status_code,
            headers=headers,
            reason=reason_phrase(event.status_code, event.reason),
        )
    )
    x.response_started = True
    if not streaming:
        await _relay_body(x, up, head or b"")
        return
    x.streamed = True
    await _stream_on(x, EventStreamRelay(x, up, headers, head or b""), "sse")


async def _relay_body(x: Exchange, up: UpstreamConnection, head: bytes) -> None:
    client = x.client
    conn = client.conn
    uh = up.h11
    timeout = client.ctx.config.upstream.read_timeout
    out = [head]
    while True:
        try:
            event = uh.next_event()
        except h11.RemoteProtocolError as exc:
            x.fail(502, f"invalid response body from backend: {exc}")
            await client.send(b"".join(out))
            return
        if event is h11.NEED_DATA:
            if out:
                await client.send(b"".join(out))
                out.clear()
            with trio.move_on_after(timeout):
                try:
                    uh.receive_data(await up.stream.receive_some(RECV_SIZE))
                except (*CLOSED, OSError):
                    x.fail(502, "backend reset the connection mid-response")
                    return
                continue
            x.fail(504, "backend went silent mid-response")
            return
        if type(event) is h11.Data:
            x.bytes_out += len(event.data)
            out.append(conn.send(event) or b"")
        elif type(event) is h11.EndOfMessage:
            out.append(conn.send(h11.EndOfMessage()) or b"")
            await client.send(b"".join(out))
            x.response_complete = x.upstream_complete = True
            return
        else:
            x.fail(502, "backend closed the connection mid-response")
            await client.send(b"".join(out))
            return


async def _switch_protocols(
    x: Exchange, up: UpstreamConnection, event: h11.InformationalResponse
) -> None:
    client = x.client
    conn = client.conn
    ctx = client.ctx
    headers = downstream_response_headers(
        event.headers, event.http_version, ctx.policy_for(x.route), upgrade=True
    )
    try:
        head = (
            conn.send(
                h11.InformationalResponse(
                    status_code=101,
                    headers=headers,
                    reason=reason_phrase(event.status_code, event.reason),
                )
            )
            or b""
        )
    except h11.LocalProtocolError:
        # h11 allows a 101 only after a complete request that asked to upgrade.
        raise BackendFailed(502, "backend switched protocols unasked") from None
    x.status = 101
    x.response_started = True
    x.upgraded = x.streamed = True
    client_pending = conn.trailing_data[0]
    backend_pending = up.h11.trailing_data[0]
    up_cfg = ctx.config.upstream
    tunnel = Tunnel(
        x,
        up,
        idle_timeout=up_cfg.stream_idle_timeout,
        half_close_timeout=up_cfg.tunnel_half_close_timeout,
    )
    if backend_pending:
        tunnel.observe_backend_bytes(backend_pending)
    await client.send(head + backend_pending)
    if client_pending:
        await up.stream.send_all(client_pending)
    # The access line is written when the tunnel ends, with its duration.
    await _stream_on(x, tunnel, "websocket")
