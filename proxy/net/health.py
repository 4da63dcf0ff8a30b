"""Active health checks: each worker probes each backend of a route that asks for it.

A probe is ``GET <health.path>`` on a fresh connection (not a pooled one: a probe must
see what a new request would), answered 2xx/3xx within ``health.timeout``. ``rise``
passing probes bring a backend back, ``fall`` failing ones take it out
(``proxy.routing.BackendHealth``). A hung backend costs the probe its timeout, never a
client request: the request path only reads the resulting flag.
"""

from __future__ import annotations

import socket

import h11
import trio

from proxy.config import HealthCheckConfig
from proxy.metrics import metrics
from proxy.net.upstream import RECV_SIZE, UpstreamPool


async def probe(pool: UpstreamPool, config: HealthCheckConfig) -> bool:
    """One probe; True if the backend answered 2xx/3xx in time."""
    backend = pool.backend
    with trio.move_on_after(config.timeout):
        try:
            stream = await connect_fresh(pool)
        except OSError:
            return False
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=backend.base_path + config.path.encode(),
                headers=[
                    (b"host", backend.authority),
                    (b"user-agent", b"switchboard-health"),
                    (b"connection", b"close"),
                ],
            )
            try:
                await stream.send_all(
                    (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                )
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(RECV_SIZE))
                        continue
                    if isinstance(event, h11.Response):
                        return 200 <= event.status_code < 400
                    if isinstance(event, h11.InformationalResponse):
                        continue
                    return False
            except (
                h11.RemoteProtocolError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ):
                return False
    return False


async def connect_fresh(pool: UpstreamPool) -> trio.SocketStream:
    """A new connection to the backend, trying its addresses in order."""
    last_error: OSError = OSError("no address")
    for family, sockaddr in pool.addresses:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise last_error


async def check_forever(pool: UpstreamPool, config: HealthCheckConfig, log: object) -> None:
    gauge = metrics().backend_up.labels(pool.backend.url)
    gauge.set(1)
    while True:
        ok = await probe(pool, config)
        if pool.health.probe(ok):
            gauge.set(0 if pool.health.probe_down else 1)
            getattr(log, "warning" if pool.health.probe_down else "info")(
                "backend_health",
                backend=pool.backend.url,
                state="down" if pool.health.probe_down else "up",
            )
        await trio.sleep(config.interval)
