"""WebSocket through the real proxy to a trio-websocket echo backend.

Text, binary, fragmented and 1 MB messages round-trip unchanged; a close started by
either side reaches the other with its code and reason, and the tunnel then ends
cleanly (no reset, the client sees the connection end).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from tests.support.backends import (
    MAX_WS_MESSAGE,
    WebSocketEchoBackend,
    WsClose,
    backend_route,
    header_values,
    pattern_chunks,
    poll_until,
    proxy_running,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess

# A tunnel a failing test leaves open must not hold the proxy's stop for 30 s.
SECTIONS = {"server": {"drain_timeout": 2.0}}


@pytest.fixture
async def ws_backend(nursery: trio.Nursery) -> WebSocketEchoBackend:
    server = WebSocketEchoBackend()
    await nursery.start(server.serve)
    return server


def _url(proxy: ProxyProcess, path: str) -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


async def _tunnel_access_line(proxy: ProxyProcess, path: str) -> dict[str, object]:
    """The access line of a tunnel, written when the tunnel has ended."""
    return await wait_for_line(
        proxy,
        lambda line: line.get("event") == "access" and line.get("path") == path,
        limit=5,
    )


async def _wait_closes(backend: WebSocketEchoBackend, count: int) -> list[WsClose]:
    await poll_until(lambda: len(backend.closes) >= count, limit=5)
    return backend.closes


async def test_text_binary_and_1mb_round_trip(
    tmp_path: Path, ws_backend: WebSocketEchoBackend
) -> None:
    big_binary = b"".join(pattern_chunks(1024 * 1024, seed=11))
    big_text = "".join(chr(0x41 + i % 26) for i in range(1024 * 1024 - 3)) + "\u2713"
    messages: list[str | bytes] = ["hello \u2713", b"\x00\x01binary\xff", big_binary, big_text]
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=SECTIONS
    ) as proxy:
        with trio.fail_after(15):
            async with trio_websocket.open_websocket_url(
                _url(proxy, "/ws/echo"), max_message_size=MAX_WS_MESSAGE
            ) as ws:
                for message in messages:
                    await ws.send_message(message)
                    echoed = await ws.get_message()
                    assert type(echoed) is type(message)
                    assert echoed == message
            access = await _tunnel_access_line(proxy, "/ws/echo")
    assert ws_backend.received == messages
    assert await _wait_closes(ws_backend, 1) == [WsClose("client", 1000, None)]
    [headers] = ws_backend.request_headers
    assert header_values(headers, "upgrade") == ["websocket"]
    assert header_values(headers, "x-forwarded-for") == ["127.0.0.1"]
    assert access["status"] == 101
    assert access["error"] is None


class _RawWebSocket:
    """A wsproto client over a plain socket: full control over frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    @classmethod
    async def connect(cls, port: int, target: str) -> _RawWebSocket:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.send(Request(host=f"127.0.0.1:{port}", target=target))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("connection closed")
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def receive_message(self) -> tuple[list[Event], str | bytes]:
        """Events up to the end of the next data message, and the reassembled message."""
        seen: list[Event] = []
        text: list[str] = []
        binary: list[bytes] = []
        while True:
            event = await self.next_event()
            seen.append(event)
            if isinstance(event, TextMessage):
                text.append(event.data)
            elif isinstance(event, BytesMessage):
                binary.append(bytes(event.data))
            if isinstance(event, Message) and event.message_finished:
                assert not (text and binary), "text and binary frames in one message"
                return seen, "".join(text) if text else b"".join(binary)

    async def read_to_eof(self) -> bytes:
        """Whatever arrives until the peer's FIN."""
        received = b""
        while data := await self.stream.receive_some(65536):
            received += data
        return received


async def test_fragmented_messages_and_client_close(
    tmp_path: Path, ws_backend: WebSocketEchoBackend
) -> None:
    text_parts = ["frag", "mented ", "t\u00ebxt"]
    binary_parts = [b"\x00" * 10, b"\x01" * 70_000, b"\x02"]
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=SECTIONS
    ) as proxy:
        with trio.fail_after(10):
            ws = await _RawWebSocket.connect(proxy.port, "/ws/frag")
            try:
                # Each fragment in its own frame and its own write; a ping in the middle
                # of a fragmented message is legal and must be answered.
                for i, part in enumerate(text_parts):
                    last = i == len(text_parts) - 1
                    await ws.send(TextMessage(data=part, message_finished=last))
                    if i == 0:
                        await ws.send(Ping(payload=b"mid-message"))
                    await trio.sleep(0.02)
                seen, echoed = await ws.receive_message()
                assert echoed == "".join(text_parts)
                assert Pong(payload=b"mid-message") in seen
                for i, chunk in enumerate(binary_parts):
                    await ws.send(BytesMessage(data=chunk, message_finished=i == 2))
                    await trio.sleep(0.02)
                _, echoed = await ws.receive_message()
                assert echoed == b"".join(binary_parts)

                # Close from the client: the backend's close reply comes back, then the
                # proxy passes on the backend's end of the connection.
                await ws.send(CloseConnection(code=1000, reason="done"))
                reply = await ws.next_event()
                assert isinstance(reply, CloseConnection)
                assert reply.code == 1000
                assert await ws.read_to_eof() == b""
            finally:
                await trio.aclose_forcefully(ws.stream)
            access = await _tunnel_access_line(proxy, "/ws/frag")
    assert ws_backend.received == ["".join(text_parts), b"".join(binary_parts)]
    assert await _wait_closes(ws_backend, 1) == [WsClose("client", 1000, "done")]
    assert access["status"] == 101
    assert access["error"] is None


async def test_client_close_propagates(tmp_path: Path, ws_backend: WebSocketEchoBackend) -> None:
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=SECTIONS
    ) as proxy:
        # aclose returns before its disconnect_timeout only when the backend's close reply
        # came back through the proxy; that timeout is beyond this guard, so without the
        # reply the test fails.
        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(
                _url(proxy, "/ws/client-close"), disconnect_timeout=600
            ) as ws:
                await ws.send_message("before close")
                assert await ws.get_message() == "before close"
                started = time.monotonic()
                await ws.aclose(code=1000, reason="client done")
                close_took = time.monotonic() - started
                assert ws.closed is not None
                assert ws.closed.code == 1000
            access = await _tunnel_access_line(proxy, "/ws/client-close")
    print(f"client-initiated close handshake through the proxy: {close_took * 1000:.1f} ms")
    assert await _wait_closes(ws_backend, 1) == [WsClose("client", 1000, "client done")]
    assert access["status"] == 101
    assert access["error"] is None


async def test_server_close_propagates(tmp_path: Path, ws_backend: WebSocketEchoBackend) -> None:
    sections = {**SECTIONS, "upstream": {"tunnel_half_close_timeout": 1.0}}
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=sections
    ) as proxy:
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(_url(proxy, "/ws/server-close")) as ws:
                await ws.send_message("close-please")
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                reason = closed.value.reason
                assert reason is not None
                assert (reason.code, reason.reason) == (4000, "bye")
                # The backend closes only after our automatic close reply reached it
                # through the proxy.
                assert await _wait_closes(ws_backend, 1) == [WsClose("server", 4000, "bye")]
            # After a server-initiated close trio-websocket's client never closes its own
            # TCP stream (it waits for the server's FIN and then only stops reading); the
            # proxy's tunnel_half_close_timeout ends the tunnel anyway, and logs it.
            with trio.fail_after(5):
                access = await _tunnel_access_line(proxy, "/ws/server-close")
            assert access["status"] == 101
    assert ws_backend.received == ["close-please"]


async def test_server_close_reaches_raw_client_then_eof(
    tmp_path: Path, ws_backend: WebSocketEchoBackend
) -> None:
    """Frame-level view of a server close: the close frame arrives, the client answers,
    and the connection then ends (the backend's FIN is passed on)."""
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=SECTIONS
    ) as proxy:
        with trio.fail_after(10):
            ws = await _RawWebSocket.connect(proxy.port, "/ws/raw-server-close")
            try:
                await ws.send(TextMessage(data="close-please"))
                event = await ws.next_event()
                assert isinstance(event, CloseConnection)
                assert (event.code, event.reason) == (4000, "bye")
                await ws.send(event.response())
                assert await ws.read_to_eof() == b""
            finally:
                await trio.aclose_forcefully(ws.stream)
            access = await _tunnel_access_line(proxy, "/ws/raw-server-close")
    assert await _wait_closes(ws_backend, 1) == [WsClose("server", 4000, "bye")]
    assert access["status"] == 101
    assert access["error"] is None
