"""Reading the PROXY protocol header a trusted load balancer sends first.

The parsing is sans-IO (``proxy.protocol.proxy_header``); this is the part that reads
from the socket under ``proxy_protocol.timeout`` and applies the trust rule: a source in
``trusted_networks`` must send a valid header, anyone else must not send one at all.
"""

from __future__ import annotations

import h11
import trio

from proxy.metrics import metrics
from proxy.net.context import WorkerContext
from proxy.net.errors import RECV_SIZE
from proxy.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    looks_like_proxy_header,
    parse_proxy_header,
    unmap_ipv4,
)

_SIGNATURE_LENGTH = len(V2_SIGNATURE)


async def read_proxy_header(
    ctx: WorkerContext, stream: trio.SocketStream, conn: h11.Connection, peer: tuple[str, int]
) -> tuple[str, int] | None:
    """The client address to use (from the header, or ``peer`` for LOCAL and for
    untrusted sources that sent none), or None when the connection must be closed.

    Bytes read past the header are handed to ``conn``, the client's h11 connection.
    """
    trusted = ctx.is_trusted_proxy(peer[0])
    buf = bytearray()
    reason = "timed out reading the PROXY header"
    with trio.move_on_after(ctx.config.proxy_protocol.timeout):
        while True:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                return None
            buf += data
            if not trusted:
                if not looks_like_proxy_header(buf[:_SIGNATURE_LENGTH]):
                    conn.receive_data(bytes(buf))
                    return peer
                if len(buf) >= _SIGNATURE_LENGTH or buf.startswith(b"PROXY "):
                    reason = "PROXY header from an untrusted source"
                    break
                continue  # "P", "PR"...: a request method or a header; read on
            try:
                parsed = parse_proxy_header(buf)
            except ProxyHeaderError as exc:
                reason = f"malformed PROXY header: {exc}"
                break
            if parsed is None:
                continue
            info, consumed = parsed
            if consumed < len(buf):
                conn.receive_data(bytes(buf[consumed:]))
            if info.command == "PROXY" and info.source is not None:
                return unmap_ipv4(info.source[0]), info.source[1]
            return peer
    metrics().refusals.labels("proxy_protocol").inc()
    ctx.log.warning("proxy_header_refused", client=peer[0], port=peer[1], reason=reason)
    return None
