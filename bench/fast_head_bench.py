"""Microseconds per request head: the h11 path against the llhttp fast path.

Both sides do the whole job the proxy needs from a head: the h11 side builds a fresh
server connection, feeds the bytes, takes the Request event and runs inspect_request;
the fast side calls parse_request_head, which includes the same inspection. Run with
``python -m bench.fast_head_bench`` (``--number``, ``--repeat`` to taste); the best of the
repeats is reported, as timeit recommends, since slower runs measure interference.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import h11

import proxy.protocol  # noqa: F401  (the strict_h11 patch, as the proxy runs h11)
from proxy.protocol.fast_head import FastHead, parse_request_head
from proxy.protocol.http1 import inspect_request

LIMIT = 16384

# What an MCP client (httpx underneath the Python SDK) sends for a tools/call.
MCP_POST = (
    b"POST /mcp HTTP/1.1\r\n"
    b"Host: mcp.example.com\r\n"
    b"Accept: application/json, text/event-stream\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"User-Agent: python-httpx/0.28.1\r\n"
    b"Content-Type: application/json\r\n"
    b"Authorization: Bearer sk_live_0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    b"Mcp-Session-Id: 1f3c9a0e7b2d4c5e8f9a0b1c2d3e4f50\r\n"
    b"Mcp-Protocol-Version: 2025-06-18\r\n"
    b"Content-Length: 187\r\n"
    b"\r\n"
)
SMALL_GET = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
CHUNKED_POST = (
    b"POST /mcp/upload?x=1 HTTP/1.1\r\n"
    b"Host: mcp.example.com\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
)
HEADS = {"mcp-post": MCP_POST, "small-get": SMALL_GET, "chunked-post": CHUNKED_POST}


def via_h11(data: bytes) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    conn.receive_data(data)
    event = conn.next_event()
    assert type(event) is h11.Request
    inspect_request(event)


def via_fast(data: bytes) -> None:
    verdict = parse_request_head(data, LIMIT)
    assert type(verdict) is FastHead


def best_us(fn: Callable[[bytes], None], data: bytes, number: int, repeat: int) -> float:
    times = timeit.repeat(lambda: fn(data), number=number, repeat=repeat)
    return min(times) / number * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--number", type=int, default=20000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"{'head':<14}{'bytes':>7}{'h11 us':>10}{'fast us':>10}{'speed-up':>10}")
    for name, data in HEADS.items():
        slow = best_us(via_h11, data, args.number, args.repeat)
        fast = best_us(via_fast, data, args.number, args.repeat)
        print(f"{name:<14}{len(data):>7}{slow:>10.2f}{fast:>10.2f}{slow / fast:>9.1f}x")


if __name__ == "__main__":
    main()
