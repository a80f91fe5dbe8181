"""Graph store benchmark: write throughput and query latency on the embedded server.

Writes random layered DAGs (the shape of attribution graphs: feature nodes at
(layer, position), edges from lower to higher layers) of several sizes with several
batch sizes, measuring nodes/s and relationships/s per phase; then measures the
latency of ``subgraph`` (depth 1 and 2, top 10 edges per node), ``strongest_paths``,
``get_graph`` and docs/cypher.md's query 7 on the largest graph. Prints the tables
(machine, date, command) and writes them to ``--out`` (default
``benchmarks/results/store.md``; ``--no-save``: not written).

    python3 benchmarks/store_benchmark.py                  # embedded server, temp dir
    python3 benchmarks/store_benchmark.py --quick          # smaller sizes
    NEO4J_URI=bolt://... python3 benchmarks/store_benchmark.py --use-env

Targets: >= 15k relationships/s written, subgraph on a 100k-edge graph < 200 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _cli import REPO, RESULTS, check_out, command_line, path, positive, run_main, write_results

from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph, GraphMetadata, Node, NodeKind, feature_node_id
from ingest.store import StoreConfig, open_store
from ingest.store.base import GraphStore
from ingest.store.embedded import DEFAULT_COMMAND_TIMEOUT_S, check_settings, embedded_server

COOKBOOK = REPO / "docs" / "cypher.md"


def random_graph(
    graph_id: str, n_edges: int, seed: int = 0, n_layers: int = 12
) -> AttributionGraph:
    """A layered DAG with about n_edges / 10 nodes and exactly ``n_edges`` edges."""
    rng = np.random.default_rng(seed)
    n_nodes = max(n_edges // 10, 2 * n_layers)
    layers = np.sort(rng.integers(0, n_layers, size=n_nodes))
    nodes = [
        Node(
            feature_node_id(int(layer), i, int(i % 16)),
            NodeKind.FEATURE,
            int(layer),
            i % 16,
            feature=i,
            activation=float(rng.uniform(0, 5)),
            influence=float(rng.uniform()),
        )
        for i, layer in enumerate(layers)
    ]
    # Sample (source, target) pairs with layer(source) < layer(target), without repeats.
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_edges:
        s = rng.integers(0, n_nodes, size=2 * n_edges)
        t = rng.integers(0, n_nodes, size=2 * n_edges)
        ok = layers[s] < layers[t]
        pairs.update(zip(s[ok].tolist(), t[ok].tolist(), strict=True))
    edges = np.array(sorted(pairs)[:n_edges], dtype=np.int64)
    rng.shuffle(edges)
    meta = GraphMetadata(
        graph_id, "bench-model", "bench-set", f"benchmark {graph_id}", task="benchmark"
    )
    return AttributionGraph(
        meta, nodes, edges[:, 0], edges[:, 1], rng.normal(size=n_edges).astype(np.float32)
    )


def server_cpu_s(store: GraphStore) -> float:
    """CPU seconds the embedded server process has used (0 when it is not local)."""
    data_dir = getattr(getattr(store, "config", None), "data_dir", None)
    try:
        pid = int((Path(data_dir) / "server.pid").read_text()) if data_dir else 0
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_write(store: GraphStore, graph: AttributionGraph, batch: int) -> dict[str, float]:
    """Throughput per phase, wall clock and per CPU-second (server + this client).

    On a shared machine the wall-clock rate depends on the load; the CPU-second rate
    estimates what one idle core sustains.
    """
    marks: dict[str, float] = {}

    def on_batch(phase: str, done: int, total: int) -> None:
        marks[f"{phase}_{'start' if done == 0 else 'end'}"] = time.perf_counter()

    store.delete_graph(graph.graph_id)  # outside the timed region
    cpu0 = server_cpu_s(store) + time.process_time()
    start = time.perf_counter()
    store.write_graph(graph, batch_size=batch, on_batch=on_batch)
    end = time.perf_counter()
    cpu = server_cpu_s(store) + time.process_time() - cpu0
    nodes_s = marks["nodes_end"] - marks["nodes_start"]
    edges_s = marks["edges_end"] - marks["edges_start"]
    return {
        "nodes": graph.n_nodes,
        "edges": graph.n_edges,
        "batch": batch,
        "nodes_per_s": graph.n_nodes / nodes_s,
        "rels_per_s": graph.n_edges / edges_s,
        "total_s": end - start,
        "rows_per_cpu_s": (graph.n_nodes + graph.n_edges) / cpu if cpu > 0 else float("nan"),
    }


def cookbook_query(number: int) -> str:
    """Query ``number`` of docs/cypher.md, as its code block holds it."""
    text = COOKBOOK.read_text()
    section = re.split(r"^### \d+\. .*$", text, flags=re.M)[number]
    return re.findall(r"```cypher\n(.*?)```", section, flags=re.S)[0]


COOKBOOK_7 = cookbook_query(7)
COOKBOOK_7_IN_PATTERN = """
MATCH (g:Graph {graph_id: $graph_id}) WHERE g.status = 'complete'
MATCH (s:GNode {graph_id: $graph_id})-[r:ATTR]->(t:GNode {graph_id: $graph_id, node_id: $logit_id})
RETURN s.node_id AS source, s.kind AS kind, r.weight AS weight
ORDER BY abs(r.weight) DESC, source LIMIT $k
"""


def latency_ms(fn, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def run(store: GraphStore, sizes: list[int], batches: list[int], repeats: int) -> str:
    run_id = uuid.uuid4().hex[:6]
    # Warm the server's JIT up on a throwaway graph first: a fresh JVM writes slower.
    warm = random_graph(f"bench-{run_id}-warmup", 20_000, seed=1)
    store.write_graph(warm)
    store.get_graph(warm.graph_id)
    store.delete_graph(warm.graph_id)
    writes = []
    for n_edges in sizes:
        graph = random_graph(f"bench-{run_id}-{n_edges}", n_edges)
        for batch in batches:
            writes.append(measure_write(store, graph, batch))
            print(
                f"  wrote {n_edges} edges, batch {batch}: {writes[-1]['rels_per_s']:.0f} rels/s",
                file=sys.stderr,
                flush=True,
            )
    big = random_graph(f"bench-{run_id}-{sizes[-1]}", sizes[-1])
    # The graph is already stored by the last write above; pick a well-connected node.
    degree = np.bincount(np.concatenate([big.sources, big.targets]), minlength=big.n_nodes)
    hub = big.nodes[int(np.argmax(degree))].node_id
    mid = big.nodes[int(np.argsort(degree)[big.n_nodes // 2])].node_id
    src = big.nodes[int(big.sources[np.argmax(np.abs(big.weights))])].node_id
    dst = big.nodes[int(big.targets[np.argmax(np.abs(big.weights))])].node_id
    gid = big.graph_id
    queries = {
        "subgraph depth 1, top 10, hub node": lambda: store.subgraph(gid, hub, depth=1, top_k=10),
        "subgraph depth 2, top 10, median node": lambda: store.subgraph(
            gid, mid, depth=2, top_k=10
        ),
        "subgraph depth 2, top 10, hub node": lambda: store.subgraph(gid, hub, depth=2, top_k=10),
        "strongest paths, max length 3, top 5": lambda: store.strongest_paths(
            gid, src, dst, top_k=5, max_length=3
        ),
        "get_graph (whole graph)": lambda: store.get_graph(gid),
        # docs/cypher.md's query 7 as written (the node id through UNWIND), and with the
        # id as a $parameter in the pattern, which ArcadeDB plans as a scan
        "cookbook query 7 (direct contributors), as written": lambda: store.query(
            COOKBOOK_7, {"graph_id": gid, "logit_id": dst, "k": 10}
        ),
        "cookbook query 7, node id as a pattern $parameter": lambda: store.query(
            COOKBOOK_7_IN_PATTERN, {"graph_id": gid, "logit_id": dst, "k": 10}
        ),
    }
    lat = {
        name: latency_ms(fn, repeats if "get_graph" not in name else 3)
        for name, fn in queries.items()
    }
    store.delete_graph(gid)
    for n_edges in sizes[:-1]:
        store.delete_graph(f"bench-{run_id}-{n_edges}")

    lines = [
        "# Graph store benchmark",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"load average at the end {os.getloadavg()[0]:.1f} (shared machine)",
        f"- server: {store.config.redacted() if hasattr(store, 'config') else 'n/a'}",
        f"- command: `{command_line()}`",
        "",
        "## Write throughput",
        "",
        "Wall-clock rates per phase (nodes, then relationships); `rows per CPU-s` is nodes "
        "plus relationships per CPU-second used by the server process and this client "
        "together, an estimate of what one idle core sustains whatever the machine's load.",
        "",
        "| edges | nodes | batch | nodes/s | relationships/s | total s | rows per CPU-s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {w['edges']:.0f} | {w['nodes']:.0f} | {w['batch']:.0f} | {w['nodes_per_s']:.0f} "
        f"| {w['rels_per_s']:.0f} | {w['total_s']:.2f} | {w['rows_per_cpu_s']:.0f} |"
        for w in writes
    ]
    lines += [
        "",
        f"## Query latency on a graph of {big.n_edges} edges, {big.n_nodes} nodes",
        "",
        "| query | median ms | max ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {med:.1f} | {worst:.1f} |" for name, (med, worst) in lat.items()]
    return "\n".join(lines) + "\n"


def heap(text: str) -> str:
    """An argparse type: a JVM heap size (``2g``, ``512m``)."""
    try:
        check_settings(text, DEFAULT_COMMAND_TIMEOUT_S)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 2k and 20k edges")
    parser.add_argument(
        "--use-env",
        action="store_true",
        help="use NEO4J_URI etc. instead of a fresh embedded server",
    )
    parser.add_argument("--heap", type=heap, default="2g", help="the embedded server's JVM heap")
    parser.add_argument("--repeats", type=positive, default=20, help="timed calls per query")
    parser.add_argument("--out", type=path, default=RESULTS / "store.md", help="results file")
    parser.add_argument("--no-save", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    if not args.no_save:
        check_out(args.out)
    # SIGTERM unwinds like ^C, so the embedded server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [2_000, 20_000] if args.quick else [10_000, 100_000]
    batches = [1_000, 5_000, 10_000]
    if args.use_env:
        with open_store(StoreConfig.from_env()) as store:
            report = run(store, sizes, batches, args.repeats)
    else:
        with (
            tempfile.TemporaryDirectory() as tmp,
            embedded_server(tmp, heap=args.heap) as config,
            open_store(config) as store,
        ):
            report = run(store, sizes, batches, args.repeats)
    print(report)
    if not args.no_save:
        write_results(args.out, report)
    return 0


if __name__ == "__main__":
    run_main(main)
