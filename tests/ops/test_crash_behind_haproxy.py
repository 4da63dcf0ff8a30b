"""A worker SIGKILLed under load behind a real HAProxy: only the requests that were on the
killed worker's connections may fail, the replacement serves, and the restart is counted.

HAProxy keeps its connections to Switchboard alive and hands any idle one to the next
request, so a request may fail that was sent after the kill, on a connection of the dead
worker whose close HAProxy had not seen yet (it then closes the client's connection
without an answer). Each such failure uses up the connection it was sent on, so the
failures are bounded by the connections the worker held when it died, which the test
reads from the kernel with the worker stopped, just before the kill.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import HttpBackend, backend_route, poll_until, proxy_running
from tests.support.haproxy import haproxy_running
from tests.support.tcp_table import held_connections

CLIENTS = 6


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_worker_killed_under_load_behind_haproxy(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = HttpBackend()
    backend_port = await nursery.start(backend.serve)
    sections = {"proxy_protocol": {"enabled": True, "trusted_networks": ["127.0.0.1/32"]}}
    async with (
        proxy_running(
            tmp_path, [backend_route(backend_port)], workers=2, sections=sections
        ) as proxy,
        haproxy_running(tmp_path, proxy.port, check_path="/healthz") as haproxy,
    ):
        url = f"http://127.0.0.1:{haproxy.port}/healthz"
        outcomes: list[tuple[float, bool]] = []  # (time, succeeded)
        stop = trio.Event()

        async def client() -> None:
            # Keep-alive to HAProxy; HAProxy keeps its own connections to Switchboard,
            # spread over both workers by SO_REUSEPORT.
            async with httpx.AsyncClient(timeout=5.0) as http:
                while not stop.is_set():
                    try:
                        response = await http.get(url)
                        ok = response.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    outcomes.append((trio.current_time(), ok))

        async with trio.open_nursery() as load:
            for _ in range(CLIENTS):
                load.start_soon(client)
            await poll_until(lambda: len(outcomes) >= 200, limit=20)
            victim = proxy.worker_pids()[0]
            killed_at = trio.current_time()
            os.kill(victim, signal.SIGSTOP)
            held = held_connections(victim, proxy.port)
            os.kill(victim, signal.SIGKILL)
            await poll_until(
                lambda: any(
                    line.get("event") == "worker_started" and line.get("restarts") == 1
                    for line in list(proxy.lines)
                ),
                limit=15,
            )
            settled_at = trio.current_time()
            before = len(outcomes)
            await poll_until(lambda: len(outcomes) >= before + 200, limit=20)
            stop.set()

        before_kill = [ok for at, ok in outcomes if at < killed_at]
        after_kill = [ok for at, ok in outcomes if at >= killed_at]
        after_restart = [ok for at, ok in outcomes if at >= settled_at]
        assert before_kill and all(before_kill)
        # At most one request fails per connection the killed worker held or had queued.
        failures = after_kill.count(False)
        assert failures <= held.total, f"{failures} failures after the kill; {held}"
        assert len(after_restart) >= 200 and all(after_restart)

        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{proxy.admin_url}/metrics")).text
        assert _metric(metrics, "switchboard_worker_restarts_total") == 1
        assert _metric(metrics, "switchboard_workers") == 2
        assert victim not in proxy.worker_pids()
