"""Runs blocking work (store queries, model computations) off the event loop.

The asyncio server must never block its loop: the Bolt driver is synchronous and
torch computations take seconds. :class:`BlockingRunner` hands each call to a thread
pool and passes the call's remaining deadline to the callee as ``timeout`` (seconds),
so the store's transaction timeout never outlives the client's deadline. Calls that
carry no deadline get ``default_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from grpc import aio

from ingest.errors import UnavailableError

T = TypeVar("T")
# Never hand the store less than this; a call this close to its deadline fails anyway.
_MIN_TIMEOUT_S = 0.05


class BlockingRunner:
    """Runs blocking callables in ``executor`` with the call's deadline as their timeout."""

    def __init__(self, executor: Executor, default_timeout_s: float) -> None:
        self._executor = executor
        self._default_timeout_s = default_timeout_s

    def timeout_for(self, context: aio.ServicerContext | None) -> float:
        """Seconds left for this call: its deadline, capped by the default."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self._default_timeout_s
        return max(_MIN_TIMEOUT_S, min(remaining, self._default_timeout_s))

    async def call(
        self,
        context: aio.ServicerContext | None,
        fn: Callable[..., T],
        /,
        *args: Any,
        pass_timeout: bool = True,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs, timeout=<seconds left>)`` in the pool, awaited."""
        if pass_timeout:
            kwargs["timeout"] = self.timeout_for(context)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise UnavailableError(
                    "the server is shutting down; retry on another replica"
                ) from None
            raise
