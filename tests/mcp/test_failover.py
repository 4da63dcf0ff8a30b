"""Fail-over between MCP replicas behind a real two-worker Switchboard.

Active checks: two replicas of the SDK demo server, each in its own process, behind an
``mcp`` route probed every 0.5 s (``rise = 1, fall = 1``). 2025-11-25 sessions are driven
with raw httpx (initialize, notifications/initialized, then tools/call ``add`` over and
over); which replica a session lives on is read from its proxy token (signed, not
encrypted: ``v1.<kid>.<payload>.<mac>``, the payload naming the replica id). Replica A is
killed with SIGKILL mid-run. Both workers take A out (each logs ``backend_health``
state=down, ``switchboard_backend_up`` of A drops to 0); from then on — an event the
test watches for, not a clock — every new session goes to B, every request of a session
on A gets 404 "Session not found" (and the session works again on B after
re-initializing), and no request a worker starts after its own "down" reaches A. No
request of a session on B ever fails.

Passive ejection: no active checks, ``eject_after = 2``: two 502s from a backend with
nothing listening take it out of rotation; every later request goes to the live one.

Every request goes over a fresh connection, so the kernel spreads them over both
workers, and each worker's own view of the replicas is exercised.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo.backend import serve
from proxy.routing import replica_id
from tests.support.backends import poll_until, proxy_running
from tests.support.proxy_process import ProxyProcess, free_port

VERSION = "2025-11-25"
PREFIX = "/mcp"
INTERVAL = 0.5
GUARD = 60.0
"""How long the test waits for what must happen (A taken out, calls made): a guard
against a hang, not a measure of speed."""
A_SESSIONS = 2
B_SESSIONS = 3
CHECKS_AFTER_WINDOW = 3
"""Requests each A session sends with its old token once both workers took A out (all
must be 404)."""
NEW_SESSIONS_AFTER = 5
CALLS_AFTER_REINIT = 3
PAUSE = 0.1
REPLICA_START_LIMIT = 40.0
SESSION_NOT_FOUND = "Session not found"
INVALID_REQUEST = -32600

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


# -- MCP over raw httpx -------------------------------------------------------------------


def rpc_message(response: httpx.Response) -> dict[str, Any] | None:
    """The JSON-RPC message of a response: a JSON body, or the last ``data:`` of an SSE
    body (the SDK answers POSTs with a short event stream)."""
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        message = response.json()
        return message if isinstance(message, dict) else None
    if content_type.startswith("text/event-stream"):
        found: dict[str, Any] | None = None
        for line in response.text.splitlines():
            if line.startswith("data:"):
                found = json.loads(line[5:].strip())
        return found
    return None


def token_replica(token: str) -> str:
    """The replica id inside a proxy session token (payload: issued_at u64, len u8, id)."""
    version, _kid, payload, _mac = token.split(".")
    assert version == "v1", token
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return raw[9 : 9 + raw[8]].decode("ascii")


@dataclass(slots=True)
class Outcome:
    kind: str
    """"initialize" or "call"."""
    sent_at: float
    done_at: float
    status: int
    """HTTP status; 0 for a transport error (connection cut mid-response)."""
    message: dict[str, Any] | None
    ok: bool
    replica: str | None = None
    """initialize: the replica named by the token the proxy answered with."""
    detail: str = ""

    @property
    def session_not_found(self) -> bool:
        error = (self.message or {}).get("error") or {}
        return (
            self.status == 404
            and error.get("code") == INVALID_REQUEST
            and error.get("message") == SESSION_NOT_FOUND
        )

    def __str__(self) -> str:
        return (
            f"{self.kind} sent={self.sent_at:.3f} done={self.done_at:.3f} "
            f"status={self.status} ok={self.ok} replica={self.replica} "
            f"message={self.message} {self.detail}"
        )


class McpClient:
    """Raw MCP over httpx; no connection is reused (each request is a new connection)."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url + PREFIX
        self.http = httpx.AsyncClient(
            timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self._next_id = 0
        self.sessions_issued: list[str] = []
        """The replica of every session token the proxy handed out."""

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def aclose(self) -> None:
        await self.http.aclose()

    async def initialize(self) -> tuple[Outcome, str | None]:
        """initialize + notifications/initialized; the outcome and the session token."""
        request_id = self.next_id()
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "initialize",
            "params": {
                "protocolVersion": VERSION,
                "capabilities": {},
                "clientInfo": {"name": "failover-test", "version": "0"},
            },
        }
        sent_at = trio.current_time()
        try:
            response = await self.http.post(self.url, json=body, headers=HEADERS)
            message = rpc_message(response)
        except httpx.HTTPError as exc:
            failed = Outcome(
                "initialize", sent_at, trio.current_time(), 0, None, False, detail=repr(exc)
            )
            return failed, None
        token = response.headers.get("mcp-session-id")
        ok = (
            response.status_code == 200
            and token is not None
            and message is not None
            and message.get("id") == request_id
            and (message.get("result") or {}).get("protocolVersion") == VERSION
        )
        outcome = Outcome(
            "initialize", sent_at, trio.current_time(), response.status_code, message, ok
        )
        if not ok or token is None:
            return outcome, None
        outcome.replica = token_replica(token)
        self.sessions_issued.append(outcome.replica)
        try:
            notified = await self.http.post(
                self.url,
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=self.session_headers(token),
            )
        except httpx.HTTPError as exc:
            outcome.ok, outcome.detail = False, f"initialized: {exc!r}"
            return outcome, None
        outcome.done_at = trio.current_time()
        if notified.status_code != 202:
            outcome.ok, outcome.detail = False, f"initialized: {notified.status_code}"
            return outcome, None
        return outcome, token

    @staticmethod
    def session_headers(token: str) -> dict[str, str]:
        return {**HEADERS, "mcp-session-id": token, "mcp-protocol-version": VERSION}

    async def add(self, token: str, a: int, b: int) -> Outcome:
        request_id = self.next_id()
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": a, "b": b}},
        }
        sent_at = trio.current_time()
        try:
            response = await self.http.post(
                self.url, json=body, headers=self.session_headers(token)
            )
            message = rpc_message(response)
        except httpx.HTTPError as exc:
            return Outcome("call", sent_at, trio.current_time(), 0, None, False, detail=repr(exc))
        result = (message or {}).get("result") or {}
        ok = (
            response.status_code == 200
            and message is not None
            and message.get("id") == request_id
            and (result.get("structuredContent") or {}).get("result") == a + b
        )
        outcome = Outcome("call", sent_at, trio.current_time(), response.status_code, message, ok)
        if response.status_code == 404 and message is not None and message.get("id") != request_id:
            outcome.detail = f"404 for id {message.get('id')}, sent {request_id}"
            outcome.message = None  # not an answer to this request: not "Session not found"
        return outcome


# -- replicas in their own processes ------------------------------------------------------


@dataclass(eq=False)
class Replica:
    process: trio.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def id(self) -> str:
        return replica_id(self.url)


async def start_replica() -> Replica:
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy.demo", "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Replica(process, port)


async def wait_healthy(replica: Replica) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        with trio.move_on_after(REPLICA_START_LIMIT):
            while replica.process.returncode is None:
                try:
                    if (await client.get(f"{replica.url}/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
            raise AssertionError(f"replica exited with {replica.process.returncode}")
    raise TimeoutError(f"replica on {replica.port} not healthy in {REPLICA_START_LIMIT} s")


@pytest.fixture
async def replica_processes() -> AsyncIterator[tuple[Replica, Replica]]:
    started: list[Replica] = []
    try:
        started = [await start_replica(), await start_replica()]
        async with trio.open_nursery() as nursery:
            for replica in started:
                nursery.start_soon(wait_healthy, replica)
        yield started[0], started[1]
    finally:
        for replica in started:
            if replica.process.returncode is None:
                replica.process.kill()
            await replica.process.wait()


# -- metrics and logs ---------------------------------------------------------------------


async def backend_up(proxy: ProxyProcess) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(f"{proxy.admin_url}/metrics")
    assert response.status_code == 200
    return {
        sample.labels["backend"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "switchboard_backend_up"
    }


def wall(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"]).timestamp()


def health_lines(proxy: ProxyProcess, url: str, state: str) -> list[dict[str, Any]]:
    return [
        line
        for line in list(proxy.lines)
        if line.get("event") == "backend_health"
        and line.get("backend") == url
        and line.get("state") == state
    ]


# -- the fail-over run --------------------------------------------------------------------


@dataclass(eq=False)
class Session:
    name: str
    token: str
    replica: str
    calls: list[tuple[int, Outcome]] = field(default_factory=list)
    """(generation, outcome): generation 0 is the first token, 1 the re-initialized one."""
    reinit: Outcome | None = None


@dataclass(eq=False)
class Run:
    kill_at: float | None = None
    taken_out_at: float | None = None
    """When the test had seen both workers log A "down": the end of the window."""
    stop: trio.Event = field(default_factory=trio.Event)
    probes: list[tuple[Outcome, Outcome | None]] = field(default_factory=list)
    """New sessions opened after the kill: (initialize, its first call)."""

    def after_window(self, outcome: Outcome) -> bool:
        return self.taken_out_at is not None and outcome.sent_at >= self.taken_out_at


async def drive_session(client: McpClient, session: Session, run: Run, replica_a: str) -> None:
    """Call ``add`` until stopped. A session of replica A, once it has had
    CHECKS_AFTER_WINDOW answers to requests sent after the window, re-initializes."""
    generation = 0
    checks = 0
    n = 0
    while not run.stop.is_set():
        n += 1
        outcome = await client.add(session.token, n, 1000)
        session.calls.append((generation, outcome))
        if session.replica == replica_a and generation == 0 and run.after_window(outcome):
            checks += 1
            if checks >= CHECKS_AFTER_WINDOW:
                init, token = await client.initialize()
                session.reinit = init
                if token is None:
                    return
                session.token, generation = token, 1
        await trio.sleep(PAUSE)


async def probe_new_sessions(client: McpClient, run: Run) -> None:
    while not run.stop.is_set():
        init, token = await client.initialize()
        call = await client.add(token, 7, 35) if token is not None else None
        run.probes.append((init, call))
        await trio.sleep(PAUSE)


async def open_sessions(client: McpClient, a: Replica, b: Replica) -> list[Session]:
    """New sessions until A_SESSIONS live on A and B_SESSIONS on B (the proxy picks)."""
    sessions: list[Session] = []
    wanted = {a.id: A_SESSIONS, b.id: B_SESSIONS}
    for _ in range(60):
        outcome, token = await client.initialize()
        assert outcome.ok and token is not None, str(outcome)
        assert outcome.replica in wanted, str(outcome)
        if wanted[outcome.replica] > 0:
            wanted[outcome.replica] -= 1
            name = f"{'A' if outcome.replica == a.id else 'B'}{len(sessions)}"
            sessions.append(Session(name, token, outcome.replica))
        if not any(wanted.values()):
            return sessions
    raise AssertionError(f"60 new sessions did not spread over both replicas: {wanted}")


@pytest.mark.slow
async def test_killed_replica_fails_over_to_survivor(
    tmp_path: Path, replica_processes: tuple[Replica, Replica]
) -> None:
    a, b = replica_processes
    route = {
        "prefix": PREFIX,
        "kind": "mcp",
        "backends": [a.url, b.url],
        "health.path": "/healthz",
        "health.interval": INTERVAL,
        # A dead loopback port refuses at once; a live replica slow to answer on a busy
        # machine must not count as down (fall = 1).
        "health.timeout": 10.0,
        "health.rise": 1,
        "health.fall": 1,
    }
    async with proxy_running(tmp_path, [route], workers=2) as proxy:
        client = McpClient(proxy.url)
        try:
            sessions = await open_sessions(client, a, b)
            assert await backend_up(proxy) == {a.url: 1.0, b.url: 1.0}
            run = Run()
            metrics_down_at: list[float] = []

            async def watch_metrics() -> None:
                await poll_until(lambda: run.kill_at is not None, limit=30)
                with trio.move_on_after(GUARD):  # never seen: the assertions say so
                    while True:
                        up = await backend_up(proxy)
                        if up.get(a.url) == 0.0:
                            metrics_down_at.append(trio.current_time())
                            assert up.get(b.url) == 1.0, up
                            return
                        await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(drive_session, client, session, run, a.id)
                nursery.start_soon(watch_metrics)
                # Every session runs on its replica before the kill.
                await poll_until(
                    lambda: all(any(o.ok for _, o in s.calls) for s in sessions), limit=GUARD
                )

                a.process.kill()  # SIGKILL: no goodbye, its sockets are reset
                run.kill_at = trio.current_time()
                wall_kill = time.time()
                nursery.start_soon(probe_new_sessions, client, run)

                await poll_until(
                    lambda: len({x["pid"] for x in health_lines(proxy, a.url, "down")}) == 2,
                    limit=GUARD,
                )
                run.taken_out_at = trio.current_time()
                a_sessions = [s for s in sessions if s.replica == a.id]
                await poll_until(
                    lambda: (
                        all(
                            sum(g == 1 for g, _ in s.calls) >= CALLS_AFTER_REINIT
                            or (s.reinit is not None and not s.reinit.ok)
                            for s in a_sessions
                        )
                        and sum(run.after_window(init) for init, _ in run.probes)
                        >= NEW_SESSIONS_AFTER
                        and all(any(run.after_window(o) for _, o in s.calls) for s in sessions)
                    ),
                    limit=GUARD,
                )
                run.stop.set()
        finally:
            await client.aclose()
        issued = client.sessions_issued
        final_up = await backend_up(proxy)
        # Every worker logs its own state change.
        await poll_until(
            lambda: len({x["pid"] for x in health_lines(proxy, a.url, "down")}) == 2, limit=5
        )
    # Read once the proxy has stopped: access lines are written in batches, the last of
    # them as the workers exit.
    access = [line for line in list(proxy.lines) if line.get("event") == "access"]

    kill_at = run.kill_at
    assert kill_at is not None
    report(sessions, run, kill_at, metrics_down_at, proxy, a, wall_kill)

    # -- sessions on B: not one failure, before, during or after -------------------------
    for session in sessions:
        if session.replica != b.id:
            continue
        failures = [str(o) for _, o in session.calls if not o.ok]
        assert not failures, f"{session.name} (on B) failed:\n" + "\n".join(failures)
        assert any(run.after_window(o) for _, o in session.calls), session.name

    # -- sessions on A --------------------------------------------------------------------
    for session in sessions:
        if session.replica != a.id:
            continue
        for generation, o in session.calls:
            if generation == 1:
                assert o.ok, f"{session.name} after re-initializing: {o}"
            elif o.done_at < kill_at:
                assert o.ok, f"{session.name} before the kill: {o}"
            elif o.sent_at < kill_at:
                # In flight at the kill: answered before A died, refused by the proxy (502:
                # the backend reset the connection before a response), or cut by the proxy
                # after the response head (the client sees an incomplete body).
                assert o.ok or o.status in (0, 502), f"{session.name} in flight: {o}"
            elif not run.after_window(o):
                # Inside the window the proxy may not know yet: a session is pinned to its
                # replica, so it gets 502 (connection refused) until this worker's probe or
                # passive ejection takes A out; from then on, 404.
                assert o.status == 502 or o.session_not_found, f"{session.name} in window: {o}"
            else:
                assert o.session_not_found, f"{session.name} after the window: {o}"
        old_after = [o for g, o in session.calls if g == 0 and run.after_window(o)]
        assert len(old_after) == CHECKS_AFTER_WINDOW, session.name
        assert session.reinit is not None, session.name
        assert session.reinit.ok and session.reinit.replica == b.id, str(session.reinit)
        assert sum(g == 1 for g, _ in session.calls) >= CALLS_AFTER_REINIT, session.name

    # -- new sessions after the kill ------------------------------------------------------
    late = [(init, call) for init, call in run.probes if run.after_window(init)]
    assert len(late) >= NEW_SESSIONS_AFTER, f"only {len(late)} new sessions after the window"
    for init, call in run.probes:
        if run.after_window(init):
            assert init.ok and init.replica == b.id, f"new session after the window: {init}"
            assert call is not None and call.ok, f"first call of a new session: {call}"
        else:
            # Inside the window a new session may still be sent to A: 502, nothing else.
            assert (init.ok and init.replica == b.id) or init.status == 502, str(init)
            if init.ok:
                assert call is not None and call.ok, f"first call of a new session: {call}"

    # -- what the operator sees -----------------------------------------------------------
    assert metrics_down_at, "switchboard_backend_up of A never became 0"
    assert final_up == {a.url: 0.0, b.url: 1.0}, final_up
    downs = health_lines(proxy, a.url, "down")
    assert len({line["pid"] for line in downs}) == 2, downs
    for line in downs:
        assert line["level"] == "warning", line
        assert wall(line) >= wall_kill, (line, wall_kill)
    assert not health_lines(proxy, b.url, "down"), "B was taken out"
    # Once a worker took A out, no request it started went to A (the access line is
    # written at the end: its start is its time less its duration; 1 ms for rounding).
    down_at = {line["pid"]: wall(line) for line in downs}
    late_to_a = [
        x
        for x in access
        if x.get("upstream") == a.url
        and wall(x) - x["duration_ms"] / 1000 > down_at[x["pid"]] + 0.001
    ]
    assert not late_to_a, late_to_a
    # The access log names the same replicas the tokens carry.
    for line in access:
        if line.get("upstream") is not None:
            assert line["replica"] == replica_id(line["upstream"]), line
    logged = Counter(
        line["replica"]
        for line in access
        if line.get("mcp_method") == "initialize" and line["status"] == 200
    )
    assert logged == Counter(issued), (logged, Counter(issued))


def report(
    sessions: list[Session],
    run: Run,
    kill_at: float,
    metrics_down_at: list[float],
    proxy: ProxyProcess,
    a: Replica,
    wall_kill: float,
) -> None:
    """Measured numbers, printed for ``pytest -s``."""
    calls = [o for s in sessions for _, o in s.calls]
    a_502 = [o for s in sessions if s.replica == a.id for _, o in s.calls if o.status == 502]
    first_404 = min(
        (o.sent_at - kill_at for o in calls if o.session_not_found), default=float("nan")
    )
    last_502 = max((o.sent_at - kill_at for o in a_502), default=float("nan"))
    probe_502 = [init for init, _ in run.probes if init.status == 502]
    downs = sorted(wall(line) - wall_kill for line in health_lines(proxy, a.url, "down"))
    print(
        f"\nfailover: {len(calls)} calls in {len(sessions)} sessions; A sessions: "
        f"{len(a_502)} x 502 (last sent {last_502:.3f} s after kill), first 404 sent "
        f"{first_404:.3f} s after kill; new sessions after kill: {len(run.probes)}, "
        f"{len(probe_502)} x 502; backend_health down logged at "
        f"{[round(d, 3) for d in downs]} s; backend_up=0 seen at "
        f"{[round(t - kill_at, 3) for t in metrics_down_at]} s"
    )


# -- passive ejection ---------------------------------------------------------------------


async def test_refused_replica_is_ejected_without_costing_a_request(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One worker (ejection is each worker's own: with one, the count is exact): a
    replica that refuses connections never received a byte, so each session it was
    picked for goes to the live replica at once; its two refusals eject it, after which
    it is not tried at all."""
    live_port: int = await nursery.start(serve, "127.0.0.1", 0)
    live = f"http://127.0.0.1:{live_port}"
    dead = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens
    route = {
        "prefix": PREFIX,
        "kind": "mcp",
        "backends": [live, dead],
        "eject_after": 2,
        "eject_seconds": 60.0,
    }
    async with proxy_running(tmp_path, [route], workers=1) as proxy:
        client = McpClient(proxy.url)
        try:
            outcomes: list[Outcome] = []
            while await ejection_count(proxy, dead) < 1:
                assert len(outcomes) < 60, "the dead backend was never picked twice"
                outcomes.append((await client.initialize())[0])
            # Counts are published a few times a second: wait for both refusals.
            refusals = 0.0
            with trio.move_on_after(10):
                while refusals < 2:
                    await trio.sleep(0.05)
                    refusals = await backend_metric(proxy, CONNECT_FAILURES, dead)
            after = [(await client.initialize())[0] for _ in range(12)]
            await trio.sleep(0.5)  # one more publish, for the count to be final
            refusals_after = await backend_metric(proxy, CONNECT_FAILURES, dead)
        finally:
            await client.aclose()
        ejections = await ejection_count(proxy, dead)

    for o in outcomes + after:
        assert o.ok and o.replica == replica_id(live), str(o)
    assert refusals == 2.0
    assert refusals_after == refusals  # ejected: no longer tried
    assert ejections == 1.0
    print(f"\npassive: ejected after {len(outcomes)} sessions, none failed")


EJECTIONS: tuple[str, dict[str, str]] = ("switchboard_backend_ejections_total", {})
CONNECT_FAILURES = ("switchboard_upstream_failures_total", {"reason": "connect"})


async def ejection_count(proxy: ProxyProcess, url: str) -> float:
    return await backend_metric(proxy, EJECTIONS, url)


async def backend_metric(
    proxy: ProxyProcess, metric: tuple[str, dict[str, str]], url: str
) -> float:
    """The value of a per-backend series in the proxy's /metrics."""
    name, labels = metric
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(f"{proxy.admin_url}/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
        and sample.labels.get("backend") == url
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )
