"""Admission checks that need Redis (rate limits, connection caps), run beside the
reactor: each in a Trio task of its own, whose answer goes back to the connection
machine that asked (``Connection.admitted``). Only requests on routes that have such
limits pay for a task; everything else never leaves the reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from proxy.admission import Buckets
from proxy.conncaps import CapDecision, Lease
from proxy.metrics import metrics
from proxy.protocol.exchange import Check

if TYPE_CHECKING:
    from proxy.net.client_io import ClientIO
    from proxy.net.context import WorkerContext


class Admission:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def start(self, io: ClientIO, check: Check) -> None:
        self.ctx.nursery.start_soon(self._run, io, check)

    def release(self, leases: Sequence[object]) -> None:
        if leases:
            self.ctx.nursery.start_soon(self._release, list(leases))

    async def _run(self, io: ClientIO, check: Check) -> None:
        control = self.ctx.control
        assert control is not None  # checks come only from the control plane's limits
        result: object
        if check.kind == Check.RATE:
            result = await control.rate_limit(cast(Buckets, check.arg))
        else:
            assert control.caps is not None
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
