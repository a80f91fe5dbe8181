"""Health status that follows the graph store's reachability.

The standard ``grpc.health.v1.Health`` service answers SERVING while the store
answers and NOT_SERVING while it does not, for the server as a whole (service name
"") and for each circuits.v1 service. :class:`StoreHealthMonitor` probes the store
every ``interval_s`` seconds and sets the status when it changes. The probe is
blocking I/O and a driver may retry a dead server for many seconds, so it runs in a
daemon thread, at most one at a time: a probe that has not answered within
``2 * interval_s`` counts as unreachable, and the next check waits on the same probe
instead of starting another (threads never pile up, and a stuck probe never delays
process exit). During graceful shutdown every status turns NOT_SERVING so load
balancers drain the server first. :class:`HealthServicer` is grpc's asyncio servicer
with ``List`` answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, with ``List`` (every service's status), which
    its reference implementation leaves unimplemented."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


class StoreHealthMonitor:
    """Periodically runs ``probe`` (raises when the store is unreachable) and sets health."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        probe: Callable[[], object],
        service_names: Sequence[str],
        interval_s: float,
    ) -> None:
        self._servicer = servicer
        self._probe = probe
        self._names = ("", *service_names)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[BaseException | None] | None = None
        self.serving: bool | None = None

    def _start_probe(self) -> asyncio.Future[BaseException | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BaseException | None] = loop.create_future()

        def deliver(error: BaseException | None) -> None:
            if not future.done():
                future.set_result(error)

        def run() -> None:
            error: BaseException | None = None
            try:
                self._probe()
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(deliver, error)

        threading.Thread(target=run, name="store-health-probe", daemon=True).start()
        return future

    async def check_once(self) -> bool:
        """Probe the store once and publish the result; return whether it answered."""
        if self._inflight is None or self._inflight.done():
            self._inflight = self._start_probe()
        try:
            error = await asyncio.wait_for(
                asyncio.shield(self._inflight), timeout=self._interval_s * 2
            )
        except TimeoutError:
            error = TimeoutError(f"no answer within {self._interval_s * 2:.1f} s")
        ok = error is None
        if not ok and self.serving is not False:
            logger.warning("graph store unreachable, health NOT_SERVING: %s", error)
        if ok and self.serving is False:
            logger.info("graph store reachable again, health SERVING")
        if ok != self.serving:
            for name in self._names:
                await self._servicer.set(name, SERVING if ok else NOT_SERVING)
        self.serving = ok
        return ok

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop probing and mark every service NOT_SERVING (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._servicer.enter_graceful_shutdown()
