"""Opening the upstream sessions that 2026-07-28 requests go within on a 2025-11-25
backend (``proxy.protocol.upstream_sessions``): ``initialize``, then
``notifications/initialized``, on a connection of their own, in a Trio task beside the
reactor (``proxy.net.admission``). The request that needed the session waits meanwhile;
every other connection goes on. Requests that need the same session while it is being
opened wait for that one opening, not one each.
"""

from __future__ import annotations

import time

import h11
import trio

from proxy.net.health import connect_fresh
from proxy.net.upstream import RECV_SIZE, UpstreamPool
from proxy.protocol.era_probe import (
    ANY,
    DISCOVER_BODY,
    INITIALIZE_BODY,
    ProbeRequest,
    RouteEras,
    era_of,
)
from proxy.protocol.eras import (
    HANDSHAKE_VERSION,
    MODERN_VERSION,
)
from proxy.protocol.mcp import METHOD_HEADER, SESSION_HEADER, VERSION_HEADER
from proxy.protocol.upstream_sessions import (
    INITIALIZED_BODY,
    MAX_HANDSHAKE_ANSWER,
    SessionKey,
    SessionRefused,
    SessionRequest,
    UpstreamSession,
    UpstreamSessions,
    initialize_result,
)

_ACCEPT = b"application/json, text/event-stream"


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class SessionOpener:
    """A worker's openings of upstream sessions, into its ``UpstreamSessions``."""

    def __init__(self, sessions: UpstreamSessions, timeout: float) -> None:
        self.sessions = sessions
        self.timeout = timeout
        self._opening: dict[SessionKey, trio.Event] = {}
        self.opened = 0
        """Sessions opened by this worker (for tests and logs)."""
        self.notified = 0
        """Notifications delivered."""
        self._probing: dict[str, trio.Event] = {}

    async def session(
        self, pool: UpstreamPool, request: SessionRequest
    ) -> UpstreamSession | SessionRefused:
        """The session ``request`` names: the one already open, the one being opened,
        or a new one."""
        if request.dedicated:
            result = await self._open(pool, request)
            self.opened += isinstance(result, UpstreamSession)
            return result
        key = request.key
        while (opening := self._opening.get(key)) is not None:
            await opening.wait()
        session = self.sessions.get(key)
        if session is not None:
            return session
        done = self._opening[key] = trio.Event()
        try:
            result = await self._open(pool, request)
        finally:
            del self._opening[key]
            done.set()
        if isinstance(result, UpstreamSession):
            self.sessions.put(key, result)
            self.opened += 1
        return result

    async def _open(
        self, pool: UpstreamPool, request: SessionRequest
    ) -> UpstreamSession | SessionRefused:
        with trio.move_on_after(self.timeout):
            try:
                answer = await _post(pool, request.target, request.body, ())
                if answer.status != 200:
                    return SessionRefused(
                        502, f"backend answered initialize with status {answer.status}"
                    )
                session_id = answer.header(SESSION_HEADER)
                if not session_id:
                    return SessionRefused(502, "backend gave no session id on initialize")
                result = initialize_result(answer.header(b"content-type") or b"", answer.body)
                if isinstance(result, str):
                    return SessionRefused(502, result)
                session = UpstreamSession(session_id.decode("latin-1"), result)
                headers = (
                    (SESSION_HEADER, session_id),
                    (VERSION_HEADER, HANDSHAKE_VERSION.encode()),
                )
                answer = await _post(pool, request.target, INITIALIZED_BODY, headers)
                if answer.status >= 300:
                    return SessionRefused(
                        502, f"backend answered notifications/initialized with {answer.status}"
                    )
                for body in request.subscribe:
                    answer = await _post(pool, request.target, body, headers)
                    if answer.status != 200:
                        return SessionRefused(
                            502, f"backend answered resources/subscribe with {answer.status}"
                        )
                return session
            except (OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
                return SessionRefused(502, f"opening a session upstream failed: {exc}")
        return SessionRefused(504, "backend did not open a session in time")

    async def probe(self, pool: UpstreamPool, request: ProbeRequest, eras: RouteEras) -> str:
        """The era the route's backends speak (``proxy.protocol.era_probe``), learnt into
        ``eras``; requests that need it meanwhile wait for the same probe."""
        route = request.route
        while (probing := self._probing.get(route)) is not None:
            await probing.wait()
        known = eras.era(route, time.monotonic())
        if known is not None:
            return known
        done = self._probing[route] = trio.Event()
        try:
            era = await self._probe(pool, request.target)
        finally:
            del self._probing[route]
            done.set()
        eras.learn(route, era, time.monotonic())
        return era or ANY

    async def _probe(self, pool: UpstreamPool, target: bytes) -> str | None:
        with trio.move_on_after(self.timeout):
            try:
                modern = (
                    (VERSION_HEADER, MODERN_VERSION.encode()),
                    (METHOD_HEADER, b"server/discover"),
                )
                discovered = await _post(pool, target, DISCOVER_BODY, modern)
                answer = await _post(pool, target, INITIALIZE_BODY, ())
                session = answer.header(SESSION_HEADER)
                initialized = answer.status == 200 and not isinstance(
                    initialize_result(answer.header(b"content-type") or b"", answer.body),
                    str,
                )
                if session:  # the probe's session ends here
                    await _request(pool, b"DELETE", target, b"", ((SESSION_HEADER, session),))
                return era_of(discovered.status == 200, initialized)
            except (OSError, h11.ProtocolError, trio.BrokenResourceError):
                return None
        return None

    async def notify(
        self,
        pool: UpstreamPool,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
    ) -> None:
        """POST a notification within a session (``notifications/cancelled``); a backend
        that cannot take it is let be: a notification has no answer to wait for."""
        with trio.move_on_after(self.timeout):
            try:
                await _post(pool, target, body, headers)
                self.notified += 1
            except (OSError, h11.ProtocolError, trio.BrokenResourceError):
                pass


async def _post(
    pool: UpstreamPool,
    target: bytes,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
) -> _Answer:
    """One POST on a fresh connection, its whole answer (an SSE answer to a request ends
    with the response to it: the server closes the stream)."""
    return await _request(pool, b"POST", target, body, headers)


async def _request(
    pool: UpstreamPool,
    method: bytes,
    target: bytes,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
) -> _Answer:
    stream = await connect_fresh(pool)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=method,
            target=target,
            headers=[
                (b"host", pool.backend.authority),
                (b"content-type", b"application/json"),
                (b"accept", _ACCEPT),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
                *headers,
            ],
        )
        await stream.send_all(
            b"".join(
                conn.send(e) or b"" for e in (request, h11.Data(data=body), h11.EndOfMessage())
            )
        )
        status = 0
        answer_headers: list[tuple[bytes, bytes]] = []
        parts: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_SIZE))
            elif isinstance(event, h11.Response):
                status, answer_headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_HANDSHAKE_ANSWER:
                    raise h11.RemoteProtocolError("initialize answer too large")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return _Answer(status, answer_headers, b"".join(parts))
