"""Health status that follows the graph store's reachability.

The standard ``grpc.health.v1.Health`` service answers SERVING while the store
answers and NOT_SERVING while it does not, for the server as a whole (service name
"") and for each circuits.v1 service. :class:`StoreHealthMonitor` probes the store
every ``interval_s`` seconds in a worker thread (the probe is blocking I/O) and sets
the status when it changes. During graceful shutdown every status turns NOT_SERVING
so load balancers drain the server first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from grpc_health.v1 import health, health_pb2

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StoreHealthMonitor:
    """Periodically runs ``probe`` (raises when the store is unreachable) and sets health."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        probe: Callable[[], object],
        service_names: Sequence[str],
        interval_s: float,
        executor: Executor | None = None,
    ) -> None:
        self._servicer = servicer
        self._probe = probe
        self._names = ("", *service_names)
        self._interval_s = interval_s
        self._executor = executor
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None

    async def check_once(self) -> bool:
        """Probe the store once and publish the result; return whether it answered."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._probe), timeout=self._interval_s * 2
            )
            ok = True
        except Exception as exc:
            ok = False
            if self.serving is not False:
                logger.warning("graph store unreachable, health NOT_SERVING: %s", exc)
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
