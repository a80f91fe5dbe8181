"""A short-lived cache of listing responses (ListGraphs pages), bounded in time and size.

A listing cannot be checked against the store more cheaply than it can be re-run
(any graph anywhere may have been added, completed or deleted by another process),
so its entries are not revalidated: they expire. A response is served only when the
store query that made it was sent at most ``ttl_s`` seconds before the call arrived;
so a graph completed or deleted by another process shows in listings at most
``ttl_s`` seconds after the change is committed. Writes made through this process
call :meth:`ListingCache.clear`. Concurrent calls for one key share one store query
(single-flight), and at most ``max_entries`` responses are kept (least recently used
first out). ``ttl_s`` 0 disables the cache.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ListingCache(Generic[V]):
    """Responses by request key, each valid ``ttl_s`` seconds (see module doc)."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._flights: dict[Hashable, asyncio.Future[tuple[float, int, V]]] = {}
        # Bumped by clear(): a response loaded before it is not used after it.
        self._generation = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every response (something was written through this process)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    async def get(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        """The response for ``key``: cached if fresh enough, else from ``load()``."""
        if self.ttl_s <= 0:
            return await load()
        asked_at, generation = self._clock(), self._generation
        while True:
            with self._lock:
                found = self._entries.get(key)
                if found is not None and found[0] >= asked_at - self.ttl_s:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return found[1]
            flight = self._flights.get(key)
            if flight is None:
                self.misses += 1
                flight = asyncio.ensure_future(self._load(key, load))
                self._flights[key] = flight
                flight.add_done_callback(lambda _: self._flights.pop(key, None))
            sent_at, sent_generation, value = await asyncio.shield(flight)
            if sent_at >= asked_at - self.ttl_s and sent_generation >= generation:
                return value

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> tuple[float, int, V]:
        sent_at, generation = self._clock(), self._generation
        value = await load()
        with self._lock:
            if generation == self._generation:
                self._entries[key] = (sent_at, value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return sent_at, generation, value
