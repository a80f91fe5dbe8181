"""A bounded in-memory cache of complete graphs, so GraphService reads skip the store.

Why it is correct: the store changes a graph only by rewriting or deleting it, and
both first give its ``:Graph`` node a fresh ``write_id`` (``ingest/store/writes.py``);
a complete graph with an unchanged ``write_id`` is byte for byte what it was. So an
entry is a :class:`~service.graph_index.GraphIndex` tagged with the ``write_id`` it
was read at, and it is current while the store still reports that ``write_id`` for a
complete graph (:meth:`GraphStore.graph_revisions`, one indexed lookup).

- **Loading**: the revision is read, then the graph, then the revision again; the copy
  is kept only when both agree (a write in between retries once, then the call is
  left to the store). Concurrent misses for one graph wait for one load
  (single-flight). A load or check is shared, so it runs under the cache's own time
  limit (``flight_timeout_s``, the server's store timeout), never one caller's
  deadline: a caller with a short deadline gives up alone (RESOURCE_EXHAUSTED at its
  deadline), and the others, and the cache, still get the graph. Loads run in the
  cache's own threads, never on the event loop.
  Graphs that are not complete (``writing``, ``deleting``) have no revision and are
  never cached: asking for them is NOT_FOUND, as the store answers.
- **Bounded memory**: an LRU over graph ids whose entries' costs (edges plus nodes,
  plus a graph's serialized Graph fields once GetGraph or StreamGraphEdges made them:
  :meth:`GraphCache.recount`) sum to at most ``max_cost``; a graph bigger than the
  whole budget is not loaded (its calls go to the store), and one that outgrows it
  when its Graph fields are made leaves the cache. ``max_cost`` 0 disables the cache.
- **Answers remembered**: GetSubgraph responses (serialized bytes) are kept by
  (graph id, revision, request) in an LRU of at most ``memo_cost`` nodes plus edges
  (0: none); :class:`CacheStats` counts answers ``remembered`` and ``computed``. The key
  holds the revision, so a remembered answer is exactly what the current graph
  gives; a rewritten graph's old answers are never matched again and age out.
- **Bounded staleness**: an entry is used only if its revision was confirmed at most
  ``revalidate_s`` seconds before the call arrived; otherwise the call waits for a
  fresh check. A background task re-checks every entry in one query every
  ``revalidate_s / 2`` seconds, so calls rarely wait. So a graph rewritten or deleted
  by another process (the ingest worker, ``circuitscope ingest``, another server) is
  no longer served from memory at most ``revalidate_s`` seconds after the change is
  committed. ``revalidate_s`` 0 checks the revision on every call (no staleness, one
  small store query per call). Writes made through this process call
  :meth:`GraphCache.invalidate`, which drops the entry at once; a call made after it
  never takes a load begun before it (that load may have read the old graph).

Anything written to a ``:GNode`` or ``:ATTR`` outside the store API (raw Cypher that
leaves ``write_id`` alone) is invisible to the check; the store never does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from ingest.errors import FailedPreconditionError, NotFoundError, ResourceExhaustedError
from ingest.store.base import Direction, GraphStore
from service.graph_index import GraphIndex

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Neighbourhoods that look at no more edges than this are computed on the event loop.
INLINE_EDGES = 4096
# Seconds a shared load or check may take (the server passes its store timeout).
FLIGHT_TIMEOUT_S = 30.0


@dataclass
class CacheStats:
    """Counters since the cache was made (monotonic; read with :meth:`GraphCache.stats`)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    checks: int = 0
    dropped: int = 0
    evicted: int = 0
    too_big: int = 0
    remembered: int = 0  # GetSubgraph answers given from remembered ones
    computed: int = 0  # GetSubgraph answers computed from an index


@dataclass
class _Entry:
    index: GraphIndex
    checked_at: float
    cost: int  # what the entry counts in the budget: its index's cost when last counted


class GraphCache:
    """Complete graphs in memory, LRU within ``max_cost`` (see module doc).

    Use from one event loop; :meth:`invalidate` may be called from any thread.
    Loads and checks run in ``executor``; neighbourhoods too big for the event loop
    (more than ``inline_edges`` edges looked at) and paths in ``compute_executor``
    (default ``executor``). Loads and checks, shared by the calls that wait for them,
    run under ``flight_timeout_s``. ``clock`` (monotonic seconds) is injectable so
    staleness can be tested.
    """

    def __init__(
        self,
        store: GraphStore,
        executor: Executor,
        *,
        max_cost: int,
        revalidate_s: float,
        memo_cost: int = 0,
        inline_edges: int = INLINE_EDGES,
        compute_executor: Executor | None = None,
        flight_timeout_s: float = FLIGHT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.flight_timeout_s = flight_timeout_s
        self._executor = executor
        self._compute = compute_executor or executor
        self.max_cost = max_cost
        self.revalidate_s = revalidate_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._cost = 0
        self._loads: dict[str, asyncio.Future[tuple[int, GraphIndex | None]]] = {}
        self._checks: dict[str, asyncio.Future[None]] = {}
        # Bumped by invalidate(): a load that started before it must not install.
        self._generation: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stats = CacheStats()
        self._refresher: asyncio.Task[None] | None = None
        self.memo_cost = memo_cost
        self.inline_edges = inline_edges
        self._memo: OrderedDict[tuple[object, ...], tuple[bytes, int]] = OrderedDict()
        self._memo_used = 0

    # ------------------------------------------------------------------ public
    @property
    def cost(self) -> int:
        """The summed cost (edges plus nodes) of the cached graphs."""
        return self._cost

    def __contains__(self, graph_id: str) -> bool:
        return graph_id in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**vars(self._stats))

    async def get(self, graph_id: str, timeout: float) -> GraphIndex | None:
        """The current index of complete graph ``graph_id``, loaded if needed; None when
        the cache cannot hold it (bigger than the budget, or changing under every
        load). NotFoundError when the store has no complete graph of that id;
        ResourceExhaustedError when a load or check this call waits for takes longer
        than ``timeout`` seconds (the call's deadline; the load goes on for others)."""
        asked_at, generation = self._clock(), self._generation.get(graph_id, 0)
        while True:
            entry = self._entries.get(graph_id)
            if entry is None:
                self._count("misses")
                loaded_generation, index = await self._single_flight(
                    self._loads, graph_id, lambda: self._load(graph_id), timeout
                )
                # A load begun before an invalidate() this call saw may have read the
                # old graph: load again (at most once more, the generation being fixed).
                if loaded_generation >= generation:
                    return index
                continue
            with self._lock:
                current = self._entries.get(graph_id) is entry
                if current and entry.checked_at >= asked_at - self.revalidate_s:
                    self._entries.move_to_end(graph_id)
                    self._stats.hits += 1
                    return entry.index
            await self._single_flight(
                self._checks,
                graph_id,
                lambda: self._check([graph_id], self.flight_timeout_s),
                timeout,
            )

    async def neighbourhood(
        self, index: GraphIndex, node_id: str, *, depth: int, top_k: int, direction: Direction
    ) -> bytes:
        """GetSubgraph's answer from ``index``, serialized (a GetSubgraphResponse's bytes,
        :meth:`GraphIndex.subgraph_bytes`): remembered, or computed on the event loop
        when it is small (a thread hop costs more), else in the compute threads."""
        key = (index.graph_id, index.write_id, node_id, depth, top_k, direction)
        with self._lock:
            remembered = self._memo.get(key)
            if remembered is not None:
                self._memo.move_to_end(key)
                self._stats.remembered += 1
                return remembered[0]

        def compute() -> tuple[bytes, int]:
            found = index.subgraph(node_id, depth=depth, top_k=top_k, direction=direction)
            return index.subgraph_bytes(found), len(found.nodes) + len(found.edges)

        per_node = top_k if direction != "both" else 2 * top_k
        bound = min(index.n_edges, sum(per_node**hop for hop in range(1, depth + 1)))
        response, cost = compute() if bound <= self.inline_edges else await self.run(compute)
        with self._lock:
            self._stats.computed += 1
            if cost <= self.memo_cost and key not in self._memo:
                self._memo[key] = (response, cost)
                self._memo_used += cost
                while self._memo_used > self.memo_cost:
                    _, (_, dropped) = self._memo.popitem(last=False)
                    self._memo_used -= dropped
        return response

    def invalidate(self, graph_id: str) -> None:
        """Forget ``graph_id`` now (it was written or deleted through this process): its
        entry, and its load in flight, which later calls do not join (it may have read
        the graph before the write)."""
        with self._lock:
            self._generation[graph_id] = self._generation.get(graph_id, 0) + 1
            self._loads.pop(graph_id, None)
            if self._remove(graph_id) is not None:
                self._stats.dropped += 1

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in the compute threads (work too big for the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def _io(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in the cache's own threads (store reads: loads, checks), which
        long computations never occupy."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        """Start re-checking every entry in the background (module doc)."""
        if self.revalidate_s > 0 and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    # ------------------------------------------------------------------ internals
    def _remove(self, graph_id: str) -> _Entry | None:
        """Take ``graph_id``'s entry out and give its cost back (hold ``_lock``)."""
        entry = self._entries.pop(graph_id, None)
        if entry is not None:
            self._cost -= entry.cost
        return entry

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    @staticmethod
    async def _single_flight(
        flights: dict[str, asyncio.Future[T]],
        key: str,
        work: Callable[[], Coroutine[Any, Any, T]],
        timeout: float,
    ) -> T:
        """Await the flight for ``key``, starting ``work()`` as it when there is none, for
        at most ``timeout`` seconds (the flight goes on for the others)."""
        flight = flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            flights[key] = flight

            def land(done: asyncio.Future[T]) -> None:
                # invalidate() may have taken this flight out and a newer one be in
                if flights.get(key) is done:
                    flights.pop(key, None)

            flight.add_done_callback(land)
        # A caller that gives up (deadline, cancel) must not cancel the others' flight.
        try:
            return await asyncio.wait_for(asyncio.shield(flight), timeout)
        except TimeoutError:
            raise ResourceExhaustedError(
                f"reading graph {key!r} from the store took longer than this call's "
                f"{timeout:.2f} s; retry with a longer deadline (the read goes on, and "
                "the graph is then answered from memory)"
            ) from None

    async def _check(self, graph_ids: list[str], timeout: float) -> None:
        """Confirm or drop the entries of ``graph_ids`` against the store's revisions."""
        sent_at = self._clock()
        revisions = await self._io(self._revisions, graph_ids, timeout)
        self._count("checks")
        with self._lock:
            for graph_id in graph_ids:
                entry = self._entries.get(graph_id)
                if entry is None:
                    continue
                current = revisions.get(graph_id)
                if current is not None and current.write_id == entry.index.write_id:
                    entry.checked_at = max(entry.checked_at, sent_at)
                else:
                    self._remove(graph_id)
                    self._stats.dropped += 1

    def _revisions(self, graph_ids: list[str], timeout: float) -> dict[str, Any]:
        return self._store.graph_revisions(graph_ids, timeout=timeout)

    async def _load(self, graph_id: str) -> tuple[int, GraphIndex | None]:
        """(the generation the load began at, the loaded index or None: :meth:`get`)."""
        generation = self._generation.get(graph_id, 0)
        loaded = await self._io(self._read, graph_id, self.flight_timeout_s)
        if loaded is None:
            return generation, None
        index, checked_at = loaded
        self._install(index, checked_at, generation)
        return generation, index

    def _read(self, graph_id: str, timeout: float) -> tuple[GraphIndex, float] | None:
        """(index, when its revision was confirmed), or None when it is not cacheable.
        Blocking: runs in the cache's threads."""
        deadline = time.monotonic() + timeout
        for _attempt in range(2):
            remaining = max(0.05, deadline - time.monotonic())
            before = self._store.graph_revisions([graph_id], timeout=remaining).get(graph_id)
            if before is None:
                raise NotFoundError(
                    f"no complete graph {graph_id!r} in the store; list graphs to find its id"
                )
            if before.n_edges + before.n_nodes > self.max_cost:
                self._count("too_big")
                return None
            try:
                graph = self._store.get_graph(graph_id, timeout=remaining)
            except (FailedPreconditionError, NotFoundError):
                continue  # rewritten or deleted under the read: look again
            checked_at = self._clock()
            after = self._store.graph_revisions([graph_id], timeout=remaining).get(graph_id)
            if after is not None and after.write_id == before.write_id:
                self._count("loads")
                return GraphIndex(graph, before.write_id), checked_at
        logger.info("graph %r changed during two loads; serving it from the store", graph_id)
        return None

    def _install(self, index: GraphIndex, checked_at: float, generation: int) -> None:
        with self._lock:
            if self._generation.get(index.graph_id, 0) != generation:
                return  # invalidated while loading: it may be the old graph
            self._remove(index.graph_id)
            cost = index.cost
            while self._entries and self._cost + cost > self.max_cost:
                self._remove(next(iter(self._entries)))  # least recently used
                self._stats.evicted += 1
            self._entries[index.graph_id] = _Entry(index, checked_at, cost)
            self._cost += cost

    def recount(self, index: GraphIndex) -> None:
        """Count ``index`` again after it grew (its serialized Graph fields were made):
        the budget takes the difference, and least recently used other graphs leave
        while it is exceeded. Grown bigger than the whole budget, the graph leaves
        itself instead (counted ``too_big``; the next call loads it again without
        those fields). Nothing happens if ``index`` is no longer the entry."""
        with self._lock:
            entry = self._entries.get(index.graph_id)
            if entry is None or entry.index is not index:
                return
            cost = index.cost
            if cost > self.max_cost:
                self._remove(index.graph_id)
                self._stats.too_big += 1
                return
            self._cost += cost - entry.cost
            entry.cost = cost
            for graph_id in list(self._entries):
                if self._cost <= self.max_cost:
                    break
                if graph_id != index.graph_id:
                    self._remove(graph_id)
                    self._stats.evicted += 1

    async def _refresh_forever(self) -> None:
        period = self.revalidate_s / 2
        while True:
            await asyncio.sleep(period)
            graph_ids = list(self._entries)
            if not graph_ids:
                continue
            try:
                await self._check(graph_ids, max(period, 1.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: calls will check for themselves
                logger.debug("graph cache re-check failed: %s", exc)
