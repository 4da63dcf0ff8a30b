"""Admission checks that need Redis (rate limits, connection caps) or a backend (the
upstream session a translated request goes within), run beside the reactor: each in a
Trio task of its own, whose answer goes back to the connection machine that asked
(``Connection.admitted``). Only requests on routes that have such limits, or that are
translated, pay for a task; everything else never leaves the reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from proxy.admission import Buckets
from proxy.conncaps import CapDecision, Lease
from proxy.metrics import metrics
from proxy.protocol.era_probe import ProbeRequest
from proxy.protocol.exchange import Check
from proxy.protocol.upstream_sessions import SessionRequest
from proxy.routing import Backend

if TYPE_CHECKING:
    from proxy.net.client_io import ClientIO
    from proxy.net.context import WorkerContext


class Admission:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def start(self, io: ClientIO, check: Check) -> None:
        self.ctx.nursery.start_soon(self._run, io, check)

    def notify(
        self, backend: Backend, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes
    ) -> None:
        """A notification for the backend (``Transport.notify_upstream``), sent by a task."""
        pool = self.ctx.pools[backend.url]
        self.ctx.nursery.start_soon(self.ctx.session_opener.notify, pool, target, headers, body)

    def release(self, leases: Sequence[object]) -> None:
        if leases:
            self.ctx.nursery.start_soon(self._release, list(leases))

    async def _run(self, io: ClientIO, check: Check) -> None:
        control = self.ctx.control
        result: object
        if check.kind == Check.SESSION:
            request = cast(SessionRequest, check.arg)
            pool = self.ctx.pools[cast(Backend, request.backend).url]
            result = await self.ctx.session_opener.session(pool, request)
        elif check.kind == Check.PROBE:
            probe = cast(ProbeRequest, check.arg)
            pool = self.ctx.pools[cast(Backend, probe.backend).url]
            result = await self.ctx.session_opener.probe(pool, probe, self.ctx.route_eras)
        elif check.kind == Check.RATE:
            assert control is not None  # these come only from the control plane's limits
            result = await control.rate_limit(cast(Buckets, check.arg))
        else:
            assert control is not None and control.caps is not None
            scope, limit = cast(tuple[str, int], check.arg)
            result = await control.caps.acquire(scope, limit)
            if isinstance(result, CapDecision):
                kind = scope.split(":", 1)[0]
                metrics().connection_cap_refusals.labels(kind, result.source).inc()
        if io.closed:
            if isinstance(result, Lease):
                await self._release([result])
            return
        try:
            io.m.admitted(result)
            io.settle()
        except Exception:
            io.r._failed(io)

    async def _release(self, leases: list[object]) -> None:
        control = self.ctx.control
        caps = control.caps if control is not None else None
        if caps is None:
            return
        for lease in leases:
            if isinstance(lease, Lease):
                await caps.release(lease)  # shielded and bounded inside
