"""The gRPC server bootstrap: one function wires everything.

:func:`start_server` builds a ``grpc.aio`` server from a :class:`ServerConfig` and a
:class:`GraphStore`:

- interceptors: :class:`ErrorMappingInterceptor` (outermost: the one place domain
  errors become status codes) then :class:`BearerTokenInterceptor` (when tokens are
  configured; health and reflection are exempt);
- servicers: circuits.v1 GraphService and FeatureService, each with the store and a
  :class:`BlockingRunner` over a thread pool (store I/O never blocks the loop);
  GraphService also with the :class:`GraphCache` of complete graphs (its own
  threads, its background re-check task started with the server) and the
  :class:`ListingCache` of ListGraphs pages; and
  AnalysisService and JobService (ingest jobs) with the served models and a
  separate model (torch) pool;
- the standard health service, whose status follows the store's reachability
  (:class:`StoreHealthMonitor`), and server reflection for generic tools;
- message-size limits on send and receive; TLS, or mutual TLS with a client CA.

:func:`serve` runs a server until SIGTERM/SIGINT, then drains it (health NOT_SERVING,
in-flight calls get ``grace_s`` seconds). :func:`serve_in_background` runs one on a
private event loop in a thread, for tests, benchmarks and embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ingest.errors import UnavailableError
from ingest.paths import home
from ingest.store.base import GraphStore
from service._generated.circuits.v1 import (
    analysis_service_pb2,
    analysis_service_pb2_grpc,
    feature_service_pb2,
    feature_service_pb2_grpc,
    graph_service_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from service.auth import BearerTokenInterceptor
from service.config import ServerConfig
from service.errors import ErrorMappingInterceptor
from service.graph_cache import GraphCache
from service.health import HealthServicer, StoreHealthMonitor
from service.jobs import JobManager
from service.listing_cache import ListingCache
from service.models import ModelRegistry
from service.runner import BlockingRunner
from service.servicers.analysis import AnalysisServicer
from service.servicers.features import FeatureServicer
from service.servicers.graphs import GraphServicer, add_graph_service
from service.servicers.jobs import JobServicer

logger = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = (
    graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name,
    feature_service_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name,
    analysis_service_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name,
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size limits, the same on both ends of a channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def probe_store(store: GraphStore, timeout_s: float = 2.0) -> None:
    """Raise when the store does not answer a trivial query."""
    store.query("RETURN 1 AS ok", timeout=timeout_s)


@dataclass
class RunningServer:
    """A started server: its bound port and what to release when it stops."""

    server: aio.Server
    port: int
    health: HealthServicer
    monitor: StoreHealthMonitor
    jobs: JobManager
    executors: tuple[ThreadPoolExecutor, ...]
    grace_s: float
    graph_cache: GraphCache | None = None
    listings: ListingCache[graph_service_pb2.ListGraphsResponse] | None = None

    async def stop(self, grace_s: float | None = None) -> bool:
        """Drain: health NOT_SERVING, refuse new calls, let in-flight ones finish;
        unfinished ingest jobs stop after their current prompt and resume at the next
        start (:meth:`service.jobs.JobManager.stop`). Every step is bounded
        (:func:`_bounded`): a step that hangs is logged and left behind. Returns whether
        the server's threads all finished; when not, the caller should exit without
        joining them (the interpreter would wait for them at exit)."""
        await _bounded(self.monitor.stop(), STEP_WAIT_S, "stopping the health monitor")
        unfinished = self.jobs.stop()
        if unfinished:
            logger.info("%d unfinished ingest job(s) left to resume at the next start", unfinished)
        grace = self.grace_s if grace_s is None else grace_s
        # grpc.aio's stop has been seen not to return (rarely, with several servers on
        # their own event loops in one process), ignoring its cancellation too
        await _bounded(self.server.stop(grace), grace + STEP_WAIT_S, "stopping the gRPC server")
        if self.graph_cache is not None:
            await _bounded(self.graph_cache.close(), STEP_WAIT_S, "closing the graph cache")
            logger.info("graph cache at shutdown: %s", self.graph_cache.stats())
        if self.listings is not None:
            logger.info(
                "listing cache at shutdown: hits=%d misses=%d",
                self.listings.hits,
                self.listings.misses,
            )
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)
        # A running ingest job stops after its current prompt: wait for that (bounded),
        # so that the journal says where it stopped before this server lets go of it.
        joined = await _bounded(
            _join(self.executors),
            max(self.grace_s, JOB_STOP_WAIT_S),
            "waiting for the server's threads (an ingest job's prompt, a store call)",
        )
        if joined:
            self.jobs.close()
        else:
            logger.warning("the ingest journal stays locked until this process exits")
        return joined


async def _bounded(work: Coroutine[Any, Any, object], seconds: float, what: str) -> bool:
    """Await ``work`` for at most ``seconds``; return whether it finished. On time out,
    log ``what`` and cancel it without waiting: ``asyncio.wait_for`` would wait for the
    cancellation to be honoured, which work that ignores it never does."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        task.result()
        return True
    task.cancel()
    logger.warning("%s did not finish within %.1f s; shutdown goes on without it", what, seconds)
    return False


#: Seconds a stopping server waits at least for a running ingest job's current prompt.
JOB_STOP_WAIT_S = 10.0
#: Seconds a stopping server gives each other step (past its grace period for gRPC's).
STEP_WAIT_S = 5.0


async def _join(executors: tuple[ThreadPoolExecutor, ...]) -> None:
    """Wait for the executors' threads to finish, joining them on a daemon thread of its
    own: not the loop's default executor, which ``asyncio.run`` waits for at exit."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not joined.done():
            joined.set_result(None)

    def join() -> None:
        for executor in executors:
            executor.shutdown(wait=True)
        with contextlib.suppress(RuntimeError):  # the loop closed while we waited
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=join, name="server-threads-join", daemon=True).start()
    await joined


def _add_port(server: aio.Server, config: ServerConfig) -> int:
    if config.tls is None:
        return server.add_insecure_port(config.address)
    credentials = grpc.ssl_server_credentials(
        [(config.tls.private_key, config.tls.cert_chain)],
        root_certificates=config.tls.client_ca,
        require_client_auth=config.tls.client_ca is not None,
    )
    return server.add_secure_port(config.address, credentials)


async def start_server(config: ServerConfig, store: GraphStore) -> RunningServer:
    """Build, bind and start the server (see module doc); the store stays the caller's."""
    interceptors: list[aio.ServerInterceptor] = [ErrorMappingInterceptor()]
    if config.auth_enabled:
        interceptors.append(BearerTokenInterceptor(config.tokens))
    else:
        logger.warning("no bearer tokens configured: every caller is accepted")
    store_pool = ThreadPoolExecutor(config.workers, thread_name_prefix="store")
    model_pool = ThreadPoolExecutor(config.model_workers, thread_name_prefix="model")
    # Ingest jobs run one at a time on a thread of their own, handing each prompt's
    # attribution to the model pool: an Attribute call waits for one prompt, not a job.
    job_pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-job")
    runner = BlockingRunner(store_pool, config.default_timeout_s)
    model_runner = BlockingRunner(model_pool, config.default_timeout_s)
    # The cache loads and re-checks in threads of its own, so a full store pool (slow
    # queries, long path searches) never delays the calls it answers from memory.
    cache_pool = ThreadPoolExecutor(2, thread_name_prefix="graph-cache")
    graph_cache = (
        GraphCache(
            store,
            cache_pool,
            max_cost=config.graph_cache_edges,
            revalidate_s=config.graph_cache_revalidate_s,
            memo_cost=config.subgraph_memo_edges,
            compute_executor=store_pool,
            flight_timeout_s=config.default_timeout_s,
        )
        if config.graph_cache_edges
        else None
    )
    listings: ListingCache[graph_service_pb2.ListGraphsResponse] | None = (
        ListingCache(config.list_cache_ttl_s) if config.list_cache_ttl_s else None
    )

    def forget(graph_id: str) -> None:
        """A graph was written through this process: no cache may serve the old one."""
        if graph_cache is not None:
            graph_cache.invalidate(graph_id)
        if listings is not None:
            listings.clear()

    # No SO_REUSEPORT (gRPC's default on Linux): a second server on a busy port would
    # bind it too and take a share of the connections; it must fail to start instead.
    options = [*channel_options(config.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = aio.server(interceptors=interceptors, options=options)
    add_graph_service(GraphServicer(store, runner, model_runner, graph_cache, listings), server)
    feature_service_pb2_grpc.add_FeatureServiceServicer_to_server(
        FeatureServicer(store, runner), server
    )
    registry = ModelRegistry(config.models)
    analysis_service_pb2_grpc.add_AnalysisServiceServicer_to_server(
        AnalysisServicer(registry, model_runner), server
    )
    artifacts_dir = config.artifacts_dir or home() / "artifacts"
    jobs = JobManager(
        store,
        registry,
        job_pool,
        artifacts_dir,
        model_executor=model_pool,
        on_graph_written=forget,
    )
    job_service_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(jobs), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_name, reflection.SERVICE_NAME), server
    )

    try:
        port = _add_port(server, config)
    except RuntimeError as exc:
        for pool in (store_pool, model_pool, job_pool, cache_pool):
            pool.shutdown(wait=False)
        raise UnavailableError(
            f"cannot listen on {config.address}: {exc}; choose another port"
        ) from None
    jobs.open()  # after the port is ours: a server that cannot start resumes nothing
    monitor = StoreHealthMonitor(
        health_servicer,
        lambda: probe_store(store, min(2.0, config.health_interval_s)),
        SERVICE_NAMES,
        config.health_interval_s,
    )
    await monitor.check_once()
    await server.start()
    monitor.start()
    if graph_cache is not None:
        graph_cache.start()
    logger.info(
        "serving circuits.v1 on port %d (%s, auth %s)",
        port,
        "TLS" if config.tls else "plaintext",
        "on" if config.auth_enabled else "off",
    )
    return RunningServer(
        server,
        port,
        health_servicer,
        monitor,
        jobs,
        (store_pool, job_pool, model_pool, cache_pool),
        config.grace_s,
        graph_cache,
        listings,
    )


async def serve(
    config: ServerConfig, store: GraphStore, announce: Callable[[str], object] | None = None
) -> bool:
    """Run until SIGTERM or SIGINT, then shut down gracefully; ``announce`` gets one line
    saying where it listens once it does. Returns :meth:`RunningServer.stop`'s answer."""
    running = await start_server(config, store)
    if announce is not None:
        where = config.address_on(running.port)
        announce(f"serving circuits.v1 on {where}; stop with Ctrl-C or SIGTERM")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down: draining in-flight calls for up to %.1f s", running.grace_s)
    finally:
        finished = await running.stop()
    return finished


@contextlib.contextmanager
def serve_in_background(config: ServerConfig, store: GraphStore) -> Iterator[RunningServer]:
    """Run a server on its own event loop in a daemon thread; stop it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-server", daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start_server(config, store), loop).result()
        try:
            yield running
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0.5), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
