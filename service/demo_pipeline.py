"""The demo's later stages: transcoders, ingest, queries and serving.

:mod:`service.demo_cli` runs these after its ``zoo-model`` stage, which leaves the
trained :class:`~ingest.zoo.trainer.ZooTrainResult` in ``ctx.results["zoo_model"]``.
Each stage reuses what an earlier run left behind when its inputs are unchanged, so a
second ``circuitscope demo`` takes seconds:

2. ``transcoders``: per-layer BatchTopK transcoders trained on the demo model's activations
   (reused when the same configuration was trained on the same weights), evaluated
   (L0, FVU, CE loss recovered, task metric with every MLP replaced), with feature
   statistics for the catalog.
3. ``ingest``: held-out greater-than prompts attributed by the ingest worker into the
   graph store (``NEO4J_URI``, or the embedded server) with full-graph artifacts.
4. ``queries``: a few cookbook-style queries over what was stored (every page of the
   model's graphs is read, keeping this run's transcoder set).
5. ``serve``: the gRPC server started in the background on the same store, and a
   client command that works against it. A server an earlier run left is stopped
   first, and waited for, but only when its pid still names that server (``/proc``
   command line: ``-m service serve`` with the demo's token file): a stale pid file
   never signals another process. The stage succeeds only when its own server says it
   listens, stays alive and answers a call made with the demo's token; otherwise it
   raises :class:`~ingest.errors.UnavailableError` (one line, exit code 2) with the end
   of the server's log. The store is closed either way.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.errors import CircuitscopeError, FailedPreconditionError
from ingest.processes import live_command_line

if TYPE_CHECKING:
    from service.demo_cli import DemoContext

#: What the queries stage prints for a listing the pruned graphs leave empty.
NO_FEATURES = "  (none: pruning kept no feature nodes; only token, error and logit nodes)"
#: Graphs per store page read by the queries stage.
QUERY_PAGE = 100
#: What ``circuitscope serve`` writes to its log once it listens (service/server.py).
ANNOUNCED = "serving circuits.v1 on"
#: How long the serve stage waits for its server to answer, and for an old one to stop.
START_TIMEOUT_S = 120.0
STOP_WAIT_S = 15.0


def _demo_dir(ctx: DemoContext) -> Path:
    from ingest.paths import home

    return home() / ("demo-tiny" if ctx.tiny else "demo")


def _train_config(ctx: DemoContext) -> Any:
    from ingest.transcoders.trainer import TrainConfig

    # The default architecture, BatchTopK (a JumpReLU at its calibrated threshold once
    # trained), whose saved set circuit-tracer loads as it is; it trains well at these
    # batch sizes (docs/transcoders.md).
    if ctx.tiny:
        return TrainConfig(
            arch="batchtopk", width=64, sparsity=4, steps=400, batch_size=64, buffer_rows=1024,
            eval_every=400, checkpoint_every=400,
        )  # fmt: skip
    return TrainConfig(
        arch="batchtopk", width=128, sparsity=16, steps=1500, batch_size=256,
        eval_every=500, checkpoint_every=500,
    )  # fmt: skip


def transcoders_stage(ctx: DemoContext) -> list[str]:
    from ingest.models import load_model
    from ingest.transcoders.evaluation import describe_task, evaluate_set
    from ingest.transcoders.feature_stats import compute_feature_stats
    from ingest.transcoders.formats import load_any
    from ingest.transcoders.formats.common import write_json
    from ingest.transcoders.sources import resolve_source
    from ingest.transcoders.trainer import train_transcoders

    model_dir = Path(ctx.results["zoo_model"].out_dir)
    loaded = load_model(str(model_dir), device=ctx.device)
    cfg = _train_config(ctx)
    out = _demo_dir(ctx) / "transcoders"
    stamp = {"config": asdict(cfg), "model": loaded.adapter.fingerprint()}
    stamp_file = out / "demo.json"
    source = resolve_source("zoo", model_dir, loaded.tokenizer)
    reused = (
        not ctx.retrain and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    )
    if not reused and out.exists():
        # The demo's own directory, left by another configuration or model: start over.
        shutil.rmtree(out)
    if reused:
        tset = load_any(out, device=loaded.adapter.device)
        report = json.loads((out / "eval.json").read_text())
    else:
        result = train_transcoders(
            loaded.adapter, source, cfg, out, model_id=loaded.model_id, progress=ctx.progress
        )
        tset = result.tset
        report = evaluate_set(
            loaded.adapter,
            tset,
            source,
            zoo_dir=model_dir,
            tokenizer=loaded.tokenizer,
            progress=ctx.progress,
        )
        write_json(out / "eval.json", report)
        stats = compute_feature_stats(
            loaded.adapter, tset, source, loaded.tokenizer, progress=ctx.progress
        )
        write_json(out / "feature_stats.json", stats)
        stamp_file.write_text(json.dumps(stamp))
    ctx.results["transcoders_dir"] = out
    ctx.results["loaded_model"] = loaded
    ctx.results["transcoder_set"] = tset
    lines = [
        f"{'reused' if reused else 'trained'} {tset.metadata.set_id}: {cfg.arch}, "
        f"{cfg.width} latents per layer, k = {cfg.sparsity}",
        f"set directory: {out}",
        "layer     L0     FVU   dead   CE loss recovered",
    ]
    for layer, r in report["layers"].items():
        lines.append(
            f"{layer:>5} {r['l0']:6.1f} {r['fvu']:7.3f} {r['dead_fraction']:6.2f}"
            f" {r['ce_loss_recovered']:10.3f}"
        )
    if report.get("task"):
        lines.append(f"every MLP replaced: {describe_task(report['task'])}")
    return lines


def ingest_stage(ctx: DemoContext) -> list[str]:
    from ingest.store import StoreConfig, open_store
    from ingest.worker.compute import AttributionComputer, feature_records
    from ingest.worker.keys import GraphSettings
    from ingest.worker.worker import IngestOptions, IngestWorker
    from ingest.zoo.tasks import get_task

    examples = get_task("greater_than").examples("heldout")[: 4 if ctx.tiny else 16]
    prompts = _demo_dir(ctx) / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": ex.prompt,
                    "counterfactual": ex.counterfactual_prompt,
                    "task": "greater_than",
                    "id": f"demo-{i}",
                }
            )
            + "\n"
            for i, ex in enumerate(examples)
        )
    )
    settings = GraphSettings()
    computer = AttributionComputer(
        ctx.results["loaded_model"], ctx.results["transcoder_set"], settings
    )
    store = open_store(StoreConfig.from_env())
    ctx.results["store"] = store
    options = IngestOptions(
        artifacts_dir=_demo_dir(ctx) / "artifacts", settings=settings, progress=ctx.progress
    )
    worker = IngestWorker(store, computer, options)
    worker.register(feature_records(ctx.results["transcoders_dir"], computer.set_id))
    summary = worker.run(prompts)
    ctx.results["set_id"] = computer.set_id
    ctx.results["model_id"] = computer.model_id
    return [f"prompts: {prompts}", _store_line(ctx), *summary.lines()]


def _store_line(ctx: DemoContext) -> str:
    """Which graph store the demo's graphs are in and, for the embedded server (which
    outlives the demo), how to stop it."""
    from ingest.store import StoreConfig

    return f"graph store: {StoreConfig.from_env().describe(ctx.results['store'].config)}"


def queries_stage(ctx: DemoContext) -> list[str]:
    from ingest.graph import NodeKind

    store = ctx.results["store"]
    # This run's transcoder set only: the store keeps graphs of earlier sets too, so
    # every page of the model's graphs is read (this set's may come after them).
    graphs = [
        g
        for g in _every_graph(store, task="greater_than", model_id=ctx.results["model_id"])
        if g.metadata.set_id == ctx.results["set_id"]
    ]
    if not graphs:
        return ["no graphs stored"]
    lines = [f"{len(graphs)} greater-than graphs stored for this set; the first three:"]
    for g in graphs[:3]:
        m = g.metadata
        lines.append(
            f"  {m.graph_id[:12]}  {g.n_nodes:4d} nodes {g.n_edges:5d} edges  "
            f"replacement {m.replacement_score:.2f} completeness {m.completeness_score:.2f}"
            f"  {m.prompt!r}"
        )
    graph = store.get_graph(graphs[0].graph_id)
    logits = [n for n in graph.nodes if n.kind is NodeKind.LOGIT]
    tokens = [n for n in graph.nodes if n.kind is NodeKind.TOKEN]
    top_logit = max(logits, key=lambda n: n.token_prob or 0.0)
    lines.append(f"strongest paths into logit {top_logit.token!r} of the first graph:")
    for source in tokens[-2:]:
        for path in store.strongest_paths(graph.graph_id, source.node_id, top_logit.node_id,
                                          top_k=1, max_length=4):  # fmt: skip
            lines.append(f"  {' -> '.join(path.node_ids)}  (score {path.score:.3g})")
    hubs = store.query(
        "MATCH (n:GNode)-[r:ATTR]->() WHERE n.graph_id = $g AND n.kind = 'feature' "
        "RETURN n.node_id AS node, count(r) AS out_edges, sum(abs(r.weight)) AS strength "
        "ORDER BY strength DESC LIMIT 3",
        {"g": graph.graph_id},
    )
    lines.append("most influential feature hubs of the first graph (node, out-edges, strength):")
    hub_lines = [f"  {h['node']}  {h['out_edges']}  {h['strength']:.3g}" for h in hubs]
    lines += hub_lines if hub_lines else [NO_FEATURES]
    shared = store.query(
        "MATCH (n:GNode)<-[:ATTR]-() WHERE n.kind = 'feature' AND n.graph_id IN $ids "
        "WITH n.layer AS layer, n.feature AS feature, collect(DISTINCT n.graph_id) AS gs "
        "RETURN layer, feature, size(gs) AS graphs ORDER BY graphs DESC, layer, feature LIMIT 5",
        {"ids": [g.graph_id for g in graphs]},
    )
    lines.append(f"features in the most circuits (layer, index: graphs of {len(graphs)}):")
    shared_lines = [f"  {r['layer']}, {r['feature']}: {r['graphs']}" for r in shared]
    lines += shared_lines if shared_lines else [NO_FEATURES]
    return lines


def _every_graph(store: Any, **filters: Any) -> Iterator[Any]:
    """The summaries of every stored graph matching ``filters``, page by page."""
    cursor = None
    while True:
        page = store.list_graphs(limit=QUERY_PAGE, cursor=cursor, **filters)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_demo_server(pid: int, token_file: Path) -> bool:
    """True when ``pid`` is a live (not zombie) ``python -m service serve`` process
    started with ``token_file``, i.e. a server an earlier demo run left behind. A stale
    pid file's pid may since belong to any other process, which must not be signalled
    (on a system without ``/proc`` nothing is recognised, so nothing is stopped)."""
    args = live_command_line(pid)
    if args is None:
        return False
    serves = (b"-m", b"service", b"serve") in zip(args, args[1:], args[2:], strict=False)
    with_token = (b"--tokens-file", os.fsencode(token_file)) in itertools.pairwise(args)
    return serves and with_token


def _stop_old_server(pid_file: Path, token_file: Path) -> str | None:
    """Stop the server an earlier demo run left (SIGTERM, then SIGKILL after its grace
    period) and wait until it is gone; a line saying so, or None when there was none."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _is_demo_server(pid, token_file):
        return None
    os.kill(pid, signal.SIGTERM)  # the server drains its calls for 5 s, then exits
    if not _gone(pid, token_file, STOP_WAIT_S):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _gone(pid, token_file, STOP_WAIT_S):
            raise FailedPreconditionError(
                f"the previous demo server (pid {pid}) does not stop: stop it (kill -9 {pid}) "
                "and run the demo again"
            )
    return f"stopped the previous demo server (pid {pid})"


def _gone(pid: int, token_file: Path, seconds: float) -> bool:
    """Wait up to ``seconds`` for the demo server ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + seconds
    while _is_demo_server(pid, token_file):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def serve_stage(ctx: DemoContext) -> list[str]:
    """Start the server; the store the earlier stages used is closed either way."""
    try:
        return _serve(ctx)
    finally:
        ctx.results["store"].close()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve(ctx: DemoContext) -> list[str]:
    from ingest.errors import UnavailableError
    from service.client import CircuitsClient, RetryPolicy

    run_dir = _demo_dir(ctx).resolve() / "serve"
    run_dir.mkdir(parents=True, exist_ok=True)
    token_file, pid_file, log_file = (run_dir / n for n in ("token", "server.pid", "server.log"))
    if not token_file.is_file():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    lines = [line for line in [_stop_old_server(pid_file, token_file)] if line]
    port = ctx.port or _free_port()
    target = f"127.0.0.1:{port}"
    log_start = log_file.stat().st_size if log_file.exists() else 0
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--port",
                str(port),
                "--tokens-file",
                str(token_file),
                "--device",
                ctx.device,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    token = token_file.read_text().strip()

    def failed(why: str) -> UnavailableError:
        last = [ln for ln in _log_since(log_file, log_start).splitlines() if ln.strip()][-1:]
        said = f" Its log ends with: {last[0].strip()}" if last else ""
        return UnavailableError(
            f"the demo's gRPC server did not start on {target}: {why}.{said} (log: {log_file}); "
            "if another server holds the port, pass --port 0 for a free one"
        )

    def wait_until_serving() -> str:
        pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise failed(f"it exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise failed(f"it did not answer within {START_TIMEOUT_S:.0f} s and was stopped")
            # Ours once it says it listens (a port is never shared) and takes our token.
            if ANNOUNCED in _log_since(log_file, log_start):
                try:
                    with CircuitsClient(
                        target, token=token, timeout_s=5.0, retry=RetryPolicy(max_attempts=1)
                    ) as client:
                        client.list_graphs(page_size=1)
                        status = client.health()
                except CircuitscopeError:
                    pass  # not answering yet: keep polling until the deadline
                else:
                    if status == "SERVING" and proc.poll() is None:
                        return status
            time.sleep(0.5)

    try:
        status = wait_until_serving()
    except BaseException:
        # A server that never came up, or a Ctrl-C while waiting for it: it runs in a
        # session of its own, so it would outlive the demo unless stopped here.
        _terminate(proc)
        raise
    ctx.results["server_pid"] = proc.pid
    ctx.results["target"] = target
    ctx.results["token_file"] = token_file
    return [
        *lines,
        f"gRPC server pid {proc.pid} on {target}: {status} (log: {log_file})",
        "try it:",
        f"  circuitscope query --target {target} --token-file {token_file} graphs list "
        "--task greater_than",
        f"stop it with: kill {proc.pid}",
        _store_line(ctx),
    ]


def _log_since(log_file: Path, offset: int) -> str:
    """What the server wrote to its log after ``offset`` bytes (the log is appended to)."""
    with log_file.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
