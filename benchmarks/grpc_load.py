"""Load test of the circuits.v1 gRPC server: N concurrent clients for a fixed time.

Sets up everything it measures, for real: an embedded graph server (ArcadeDB over
Bolt) in a temporary directory, a benchmark graph written through the store API,
and ``circuitscope serve`` in its own process (so clients and server do not share a
GIL). Then ``--clients`` concurrent callers (asyncio tasks over ``--channels`` grpc.aio
channels) alternate GetSubgraph and ListGraphs (page of 50) for ``--seconds``
seconds, after a warm-up. Before that, one caller times sequential calls of each
method (what a request costs without queueing), and of GetGraph for the whole
benchmark graph (from the graph cache, or from the store with ``--graph-cache-edges 0``).

GetSubgraph asks for ~1k-edge neighbourhoods (depth 2, top_k 32, direction out) of a
24-layer graph with 40 features per layer (~39k edges): every node whose answer has
1000-1100 edges is a centre (about 900), and each call picks one at random (seeded
by ``--seed`` and the client's number), so the server's remembered answers
(``--subgraph-memo-edges``, about 220 such answers at the default) cannot answer
most calls; the memo's hit rate is read from the server's cache counters. Reports
p50/p99 latency per method, throughput, errors, distinct requests, mean edges per
response, the machine and the date, as Markdown on stdout and in ``--out``.

Usage: ``python3 benchmarks/grpc_load.py [--clients 64] [--seconds 30] [--out FILE]``.

With ``--target HOST:PORT`` it loads an existing server instead, with the token in
``CIRCUITSCOPE_TOKEN``. That server must hold the benchmark graphs: ``--setup-only``
writes them into the graph store named by ``NEO4J_URI`` etc. (the embedded server in
``$CIRCUITSCOPE_HOME`` without it), the store ``circuitscope serve`` reads with the same
environment, and exits::

    NEO4J_URI=bolt://... python3 benchmarks/grpc_load.py --setup-only
    CIRCUITSCOPE_TOKEN=... python3 benchmarks/grpc_load.py --target HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _cli import (  # noqa: E402  (benchmarks/_cli.py; tests.service needs REPO first)
    check_out,
    command_line,
    finite_at_least,
    int_in,
    path,
    positive,
    positive_float,
    run_main,
    write_results,
)

from ingest.errors import (  # noqa: E402
    CircuitscopeError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)

GRAPH_ID = "bench-deep"
N_GRAPHS = 200  # small graphs so ListGraphs has pages to serve
N_LAYERS, WIDTH = 24, 40
DEPTH, TOP_K = 2, 32
EDGES_LOW, EDGES_HIGH = 1000, 1100  # a centre's answer has this many edges
# The server process: what `circuitscope serve` runs, without the rest of the CLI.
SERVER_SCRIPT = """
import asyncio, logging, sys
from ingest.store import StoreConfig, open_store
from service.config import ServerConfig, load_tokens
from service.server import serve
import os
logging.basicConfig(level=logging.WARNING)
logging.getLogger("service.server").setLevel(logging.INFO)
config = ServerConfig(port=int(sys.argv[1]), workers=int(sys.argv[2]),
                      tokens=load_tokens(os.environ["CIRCUITSCOPE_TOKENS"], None),
                      graph_cache_edges=int(sys.argv[3]),
                      graph_cache_revalidate_s=float(sys.argv[4]),
                      list_cache_ttl_s=float(sys.argv[5]),
                      subgraph_memo_edges=int(sys.argv[6]))
with open_store(StoreConfig.from_env()) as store:
    asyncio.run(serve(config, store))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def benchmark_graph():  # type: ignore[no-untyped-def]
    from tests.service.builders import layered_graph

    return layered_graph(
        GRAPH_ID,
        n_layers=N_LAYERS,
        width=WIDTH,
        n_tokens=1,
        n_logits=5,
        prompt="benchmark big graph",
        task="bench",
    )


def centres() -> list[str]:
    """The nodes of the benchmark graph whose neighbourhood has 1000-1100 edges."""
    from service.graph_index import GraphIndex

    index = GraphIndex(benchmark_graph(), "local")
    return [
        node_id
        for node_id in index.node_ids
        if EDGES_LOW
        <= len(index.subgraph(node_id, depth=DEPTH, top_k=TOP_K, direction="out").edges)
        <= EDGES_HIGH
    ]


def setup_store(store) -> int:  # type: ignore[no-untyped-def]
    """Write the benchmark graphs; return the edge count of the big graph."""
    from tests.service.builders import layered_graph

    big = benchmark_graph()
    if not store.list_graphs(prompt_contains="benchmark big", limit=1).items:
        store.write_graph(big, replace=True)
        for i in range(N_GRAPHS):
            store.write_graph(
                layered_graph(f"bench-small-{i:04d}", prompt=f"benchmark small {i}", task="bench"),
                replace=True,
            )
    return int(big.n_edges)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


#: Sequential GetGraph calls of the whole benchmark graph in the single-caller baseline.
WHOLE_GRAPH_CALLS = 5


async def run_load(
    target: str,
    token: str,
    clients: int,
    channels: int,
    seconds: float,
    warmup: float,
    seed: int,
    server_pid: int | None = None,
    baseline_calls: int = 20,
) -> dict[str, object]:
    from grpc import aio

    from service._generated.circuits.v1 import graph_service_pb2_grpc
    from service.server import channel_options

    opts = channel_options(64 * 1024 * 1024)
    chans = [aio.insecure_channel(target, options=opts) for _ in range(channels)]
    try:
        return await _load(
            [graph_service_pb2_grpc.GraphServiceStub(c) for c in chans],
            token, clients, seconds, warmup, seed, server_pid, baseline_calls,
        )  # fmt: skip
    finally:
        for c in chans:
            await c.close()


async def _load(
    stubs: list[Any],
    token: str,
    clients: int,
    seconds: float,
    warmup: float,
    seed: int,
    server_pid: int | None,
    baseline_calls: int,
) -> dict[str, object]:
    import grpc

    from service._generated.circuits.v1 import graph_service_pb2 as pb
    from service.auth import bearer_metadata

    metadata = bearer_metadata(token)
    sub_reqs = [
        pb.GetSubgraphRequest(
            graph_id=GRAPH_ID, node_id=c, depth=DEPTH, top_k=TOP_K, direction=pb.DIRECTION_OUT
        )
        for c in centres()
    ]
    list_req = pb.ListGraphsRequest(task="bench", page_size=50)
    latencies: dict[str, list[float]] = {"GetSubgraph": [], "ListGraphs": []}
    errors: Counter[str] = Counter()
    edges_seen: list[int] = []  # edges per measured GetSubgraph response
    asked: set[str] = set()  # centres asked for in the measured phase
    measure_from = stop_at = 0.0

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        rng = random.Random(seed * 1000 + i)
        n = i
        while time.perf_counter() < stop_at:
            method = "GetSubgraph" if n % 2 == 0 else "ListGraphs"
            n += 1
            t0 = time.perf_counter()
            try:
                if method == "GetSubgraph":
                    sub_req = rng.choice(sub_reqs)
                    resp = await stub.GetSubgraph(sub_req, metadata=metadata, timeout=30)
                    if t0 >= measure_from:
                        edges_seen.append(len(resp.edges))
                        asked.add(sub_req.node_id)
                else:
                    await stub.ListGraphs(list_req, metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                if t0 >= measure_from:
                    errors[f"{method} {exc.code().name}"] += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                latencies[method].append(t1 - t0)

    # Baseline: one caller, sequential calls (what a request costs without queueing).
    baseline: dict[str, list[float]] = {"GetSubgraph": [], "ListGraphs": []}
    for i in range(baseline_calls):
        for method, call, req in (
            ("GetSubgraph", stubs[0].GetSubgraph, sub_reqs[i * 37 % len(sub_reqs)]),
            ("ListGraphs", stubs[0].ListGraphs, list_req),
        ):
            t0 = time.perf_counter()
            await call(req, metadata=metadata, timeout=30)
            baseline[method].append(time.perf_counter() - t0)
    # The whole benchmark graph, sequentially: from the graph cache (loaded by the
    # GetSubgraph calls above) or, with --graph-cache-edges 0, from the store.
    whole = pb.GetGraphRequest(graph_id=GRAPH_ID)
    baseline["GetGraph (whole graph)"] = []
    for _ in range(WHOLE_GRAPH_CALLS):
        t0 = time.perf_counter()
        await stubs[0].GetGraph(whole, metadata=metadata, timeout=60)
        baseline["GetGraph (whole graph)"].append(time.perf_counter() - t0)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    cpu_before = (_cpu_seconds(server_pid), _own_cpu_seconds())
    await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    cpu = (_cpu_seconds(server_pid) - cpu_before[0], _own_cpu_seconds() - cpu_before[1])
    return {
        "latencies": latencies,
        "errors": errors,
        "edges": statistics.fmean(edges_seen) if edges_seen else 0.0,
        "edges_range": (min(edges_seen), max(edges_seen)) if edges_seen else (0, 0),
        "centres": len(sub_reqs),
        "asked": len(asked),
        "baseline": baseline,
        "load": (load_before, os.getloadavg()[0]),
        "cpu": (cpu[0] / elapsed, cpu[1] / elapsed) if server_pid else None,
    }


def _cpu_seconds(pid: int | None) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux /proc)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def report(result: dict[str, object], args: argparse.Namespace) -> str:
    latencies: dict[str, list[float]] = result["latencies"]  # type: ignore[assignment]
    errors: Counter[str] = result["errors"]  # type: ignore[assignment]
    total = sum(len(v) for v in latencies.values())
    import grpc

    lines = [
        "# gRPC load benchmark (benchmarks/grpc_load.py)",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}",
        f"- command: `{command_line()}`",
        f"- {args.clients} concurrent clients over {args.channels} channels, "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; "
        + (
            f"server {args.target} (its own settings; the server flags do not apply)"
            if args.target
            else "server and embedded graph store on loopback in their own processes"
        ),
        f"- GetSubgraph: depth {DEPTH}, top_k {TOP_K}, direction out, centre drawn at random "
        f"per call from {result['centres']} distinct requests ({result['asked']} asked in the "
        f"measured phase) on a {N_LAYERS}-layer graph of {result.get('graph_edges', '?')} "
        f"edges; mean {result['edges']:.1f} edges per response "
        f"(min {result['edges_range'][0]}, max {result['edges_range'][1]})",  # type: ignore[index]
        f"- memo: {memo_line(result)}",
        "- ListGraphs: task filter, page_size 50",
        "",
        "| method | calls | throughput (calls/s) | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, values in latencies.items():
        ms = [v * 1000 for v in values]
        lines.append(
            f"| {method} | {len(ms)} | {len(ms) / args.seconds:.1f} | "
            f"{percentile(ms, 50):.1f} | {percentile(ms, 99):.1f} | "
            f"{max(ms) if ms else float('nan'):.1f} |"
        )
    all_ms = [v * 1000 for vs in latencies.values() for v in vs]
    lines.append(
        f"| all | {total} | {total / args.seconds:.1f} | {percentile(all_ms, 50):.1f} | "
        f"{percentile(all_ms, 99):.1f} | {max(all_ms) if all_ms else float('nan'):.1f} |"
    )
    lines += ["", f"errors: {sum(errors.values())}" + (f" ({dict(errors)})" if errors else "")]
    baseline: dict[str, list[float]] = result["baseline"]  # type: ignore[assignment]
    load: tuple[float, float] = result["load"]  # type: ignore[assignment]
    lines.append(
        "single caller, sequential (no queueing): "
        + ", ".join(
            f"{m} p50 {percentile([v * 1000 for v in vs], 50):.1f} ms" for m, vs in baseline.items()
        )
    )
    lines.append(
        f"first GetSubgraph call: {baseline['GetSubgraph'][0] * 1000:.1f} ms"
        + (
            " (the graph cache is cold: it loads the graph)"
            if args.graph_cache_edges and not args.target
            else ""
        )
    )
    if not args.target:
        lines.append(
            f"server caches: graph cache {args.graph_cache_edges} edges, revalidated every "
            f"{args.graph_cache_revalidate:g} s, GetSubgraph answers remembered up to "
            f"{args.subgraph_memo_edges} nodes+edges; ListGraphs pages kept "
            f"{args.list_cache_ttl:g} s"
            + "".join(f"; {c}" for c in result.get("server_caches", []))  # type: ignore[attr-defined]
        )
    lines.append(
        f"1-minute load average before / after the concurrent phase: {load[0]:.1f} / "
        f"{load[1]:.1f} on {os.cpu_count()} CPUs (other work shares the machine)"
    )
    cpu: tuple[float, float] | None = result.get("cpu")  # type: ignore[assignment]
    if cpu is not None:
        lines.append(
            f"CPU busy during the concurrent phase (cores): server process {cpu[0]:.2f}, "
            f"load-generating client process {cpu[1]:.2f}"
        )
    if all_ms:
        lines.append(f"mean latency {statistics.fmean(all_ms):.1f} ms")
    return "\n".join(lines) + "\n"


def memo_line(result: dict[str, object]) -> str:
    """GetSubgraph answers remembered vs computed, from the server's cache counters."""
    found = [
        re.search(r"remembered=(\d+), computed=(\d+)", line)
        for line in result.get("server_caches", [])  # type: ignore[attr-defined]
    ]
    counts = next((m for m in found if m), None)
    if counts is None:
        return "no server counters (external target or no graph cache)"
    remembered, computed = int(counts[1]), int(counts[2])
    total = remembered + computed
    rate = remembered / total if total else 0.0
    return (
        f"{remembered} of {total} GetSubgraph answers from remembered ones "
        f"({rate:.1%} hit rate; {computed} computed from the in-memory graph), "
        "whole server run incl. warm-up"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive, default=64, help="concurrent callers")
    parser.add_argument("--channels", type=positive, default=8, help="grpc.aio channels")
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=finite_at_least(0.0), default=3.0, help="seconds")
    parser.add_argument("--server-workers", type=positive, default=16, help="server flag")
    parser.add_argument(
        "--graph-cache-edges", type=int_in(0), default=3_000_000, help="server flag (0: no cache)"
    )
    parser.add_argument(
        "--graph-cache-revalidate", type=finite_at_least(0.0), default=1.0, help="server flag"
    )
    parser.add_argument(
        "--list-cache-ttl",
        type=finite_at_least(0.0),
        default=1.0,
        help="server flag (0: no listing cache)",
    )
    parser.add_argument(
        "--subgraph-memo-edges", type=int_in(0), default=250_000, help="server flag (0: no memo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the centres drawn")
    parser.add_argument("--target", help="load an existing server (HOST:PORT) instead")
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="write the benchmark graphs into the store NEO4J_URI etc. name (a --target "
        "server's), then exit",
    )
    parser.add_argument("--out", type=path, help="also write the Markdown report here")
    args = parser.parse_args()
    if args.out is not None:
        check_out(args.out)

    if args.setup_only:
        return setup_only()
    if args.target:
        result = load_target(args)
    else:
        from ingest.store import open_store
        from ingest.store.embedded import embedded_server

        with (
            tempfile.TemporaryDirectory(prefix="grpc-load-") as tmp,
            embedded_server(Path(tmp) / "db", heap="1g") as store_config,
            open_store(store_config) as store,
        ):
            graph_edges = setup_store(store)
            print(f"benchmark graph written: {graph_edges} edges", file=sys.stderr)
            token = secrets.token_urlsafe(24)
            port = _free_port()
            env = dict(
                os.environ,
                CIRCUITSCOPE_TOKENS=token,
                CIRCUITSCOPE_HOME=tmp,
                NEO4J_URI=store_config.uri or "",
                NEO4J_USER=store_config.user,
                NEO4J_PASSWORD=store_config.password or "",
                NEO4J_DATABASE=store_config.database,
                PYTHONPATH=str(REPO),
            )
            server_log = Path(tmp) / "server.log"
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SERVER_SCRIPT,
                    str(port),
                    str(args.server_workers),
                    str(args.graph_cache_edges),
                    str(args.graph_cache_revalidate),
                    str(args.list_cache_ttl),
                    str(args.subgraph_memo_edges),
                ],
                env=env,
                stderr=server_log.open("w"),
            )
            try:
                _wait_serving(f"127.0.0.1:{port}", server)
                result = asyncio.run(
                    run_load(
                        f"127.0.0.1:{port}",
                        token,
                        args.clients,
                        args.channels,
                        args.seconds,
                        args.warmup,
                        args.seed,
                        server.pid,
                    )
                )
                result["graph_edges"] = graph_edges
            finally:
                server.terminate()
                server.wait(timeout=30)
                log = server_log.read_text(errors="replace").splitlines()
                for line in log:
                    if "cache at shutdown" not in line:
                        print(line, file=sys.stderr)
            result["server_caches"] = [
                ln.split("INFO:service.server:")[-1] for ln in log if "cache at shutdown" in ln
            ]
    text = report(result, args)
    print(text)
    if args.out:
        write_results(args.out, text)
    return 0


def setup_only() -> int:
    """Write the benchmark graphs into the store of the environment (``NEO4J_*``)."""
    from ingest.store import StoreConfig, open_store

    config = StoreConfig.from_env()
    with open_store(config) as store:
        graph_edges = setup_store(store)
        where = config.describe(store.config)
    print(
        f"benchmark graphs in {where}: {GRAPH_ID} ({graph_edges} edges) and {N_GRAPHS} small "
        "ones; serve that store (`circuitscope serve`, same NEO4J_* environment) and run "
        "with --target HOST:PORT"
    )
    return 0


def load_target(args: argparse.Namespace) -> dict[str, object]:
    """Load ``--target``; its refusals are one-line errors that say what to do."""
    import grpc

    try:
        result = asyncio.run(
            run_load(
                args.target,
                os.environ.get("CIRCUITSCOPE_TOKEN", ""),
                args.clients,
                args.channels,
                args.seconds,
                args.warmup,
                args.seed,
            )
        )
    except grpc.RpcError as exc:
        raise _target_error(args.target, exc) from None
    result["graph_edges"] = int(benchmark_graph().n_edges)  # what --setup-only writes
    return result


def _target_error(target: str, exc: Any) -> CircuitscopeError:
    import grpc

    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(
            f"the server at {target} answered NOT_FOUND ({details}): it does not hold the "
            f"benchmark graph {GRAPH_ID!r}; write it into the store that server reads with "
            "`python3 benchmarks/grpc_load.py --setup-only` (same NEO4J_* environment)"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(
            f"the server at {target} answered UNAUTHENTICATED ({details}): set "
            "CIRCUITSCOPE_TOKEN to a token that server accepts"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(
            f"cannot reach a server at {target} ({code.name}: {details}): check --target "
            "and that the server is running"
        )
    return CircuitscopeError(f"the server at {target} answered {code.name}: {details}")


def _wait_serving(target: str, proc: subprocess.Popen[bytes]) -> None:
    from service.client import CircuitsClient

    deadline = time.monotonic() + 120
    with CircuitsClient(target, timeout_s=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode}")
            try:
                if client.health() == "SERVING":
                    return
            except Exception:
                pass
            time.sleep(0.5)
    raise SystemExit("the server did not become SERVING within 120 s")


if __name__ == "__main__":
    run_main(main)
