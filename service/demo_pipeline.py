"""The demo's later stages: transcoders, ingest, queries and serving.

:mod:`service.demo_cli` runs these after its ``zoo-model`` stage, which leaves the
trained :class:`~ingest.zoo.trainer.ZooTrainResult` in ``ctx.results["zoo_model"]``.
Each stage reuses what an earlier run left behind when its inputs are unchanged, so a
second ``circuitscope demo`` takes seconds:

2. ``transcoders``: per-layer TopK transcoders trained on the demo model's activations
   (reused when the same configuration was trained on the same weights), evaluated
   (L0, FVU, CE loss recovered, task metric with every MLP replaced), with feature
   statistics for the catalog.
3. ``ingest``: held-out greater-than prompts attributed by the ingest worker into the
   graph store (``NEO4J_URI``, or the embedded server) with full-graph artifacts.
4. ``queries``: a few cookbook-style queries over what was stored.
5. ``serve``: the gRPC server started in the background on the same store, and a
   client command that works against it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.demo_cli import DemoContext

#: What the queries stage prints for a listing the pruned graphs leave empty.
NO_FEATURES = "  (none: pruning kept no feature nodes; only token, error and logit nodes)"


def _demo_dir(ctx: DemoContext) -> Path:
    from ingest.paths import home

    return home() / ("demo-tiny" if ctx.tiny else "demo")


def _train_config(ctx: DemoContext) -> Any:
    from ingest.transcoders.trainer import TrainConfig

    # TopK: exactly k latents per token, whatever the demo's small batches
    if ctx.tiny:
        return TrainConfig(
            arch="topk", width=64, sparsity=4, steps=400, batch_size=64, buffer_rows=1024,
            eval_every=400, checkpoint_every=400,
        )  # fmt: skip
    return TrainConfig(
        arch="topk", width=128, sparsity=16, steps=1500, batch_size=256,
        eval_every=500, checkpoint_every=500,
    )  # fmt: skip


def transcoders_stage(ctx: DemoContext) -> list[str]:
    from ingest.models import load_model
    from ingest.transcoders.evaluation import evaluate_set
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
    task = report.get("task") or {}
    if task:
        lines.append(f"task metric with every MLP replaced: {json.dumps(task)}")
    return lines


def ingest_stage(ctx: DemoContext) -> list[str]:
    from ingest.store import open_store
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
    store = open_store()
    ctx.results["store"] = store
    options = IngestOptions(
        artifacts_dir=_demo_dir(ctx) / "artifacts", settings=settings, progress=ctx.progress
    )
    worker = IngestWorker(store, computer, options)
    worker.register(feature_records(ctx.results["transcoders_dir"], computer.set_id))
    summary = worker.run(prompts)
    ctx.results["set_id"] = computer.set_id
    ctx.results["model_id"] = computer.model_id
    return [f"prompts: {prompts}", *summary.lines()]


def queries_stage(ctx: DemoContext) -> list[str]:
    from ingest.graph import NodeKind

    store = ctx.results["store"]
    page = store.list_graphs(task="greater_than", model_id=ctx.results["model_id"], limit=100)
    # This run's transcoder set only: the store keeps graphs of earlier sets too.
    graphs = [g for g in page.items if g.metadata.set_id == ctx.results["set_id"]]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_stage(ctx: DemoContext) -> list[str]:
    from service.client import CircuitsClient

    run_dir = _demo_dir(ctx) / "serve"
    run_dir.mkdir(parents=True, exist_ok=True)
    token_file, pid_file, log_file = (run_dir / n for n in ("token", "server.pid", "server.log"))
    if not token_file.is_file():
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    if pid_file.is_file() and _alive(int(pid_file.read_text())):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        time.sleep(2.0)
    port = ctx.port or _free_port()
    target = f"127.0.0.1:{port}"
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
    pid_file.write_text(str(proc.pid))
    token = token_file.read_text().strip()
    deadline = time.monotonic() + 120
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").splitlines()[-10:]
            return ["the server exited while starting; its log ends with:", *tail]
        try:
            with CircuitsClient(target, token=token, timeout_s=5.0) as client:
                status = client.health()
                if status == "SERVING":
                    break
        except Exception:
            pass  # not up yet: keep polling until the deadline
        time.sleep(1.0)
    ctx.results["store"].close()
    ctx.results["server_pid"] = proc.pid
    ctx.results["target"] = target
    ctx.results["token_file"] = token_file
    return [
        f"gRPC server pid {proc.pid} on {target}: {status} (log: {log_file})",
        "try it:",
        f"  circuitscope query --target {target} --token-file {token_file} graphs list "
        "--task greater_than",
        f"stop it with: kill {proc.pid}",
    ]
