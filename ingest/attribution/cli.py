"""``circuitscope attribute``: the attribution graph of one prompt.

    circuitscope attribute --model DIR --transcoders DIR "prompt"
        [--out ARTIFACT_DIR] [--json PATH] [--full-json] [--device D] [--dtype float32|float64]
        [--batch-size N] [--max-feature-nodes N] [--max-n-logits N] [--desired-logit-prob P]
        [--logit-diff CORRECT COUNTERFACTUAL | --feature-target LAYER INDEX POS]
        [--node-threshold X] [--edge-threshold Y]

Computes the full graph (DESIGN 5.2) with a progress bar, prunes it (5.3), prints a
summary, and writes the compact artifact (``--out``, the full graph) and the
circuit-tracer / Neuronpedia JSON (``--json``, pruned unless ``--full-json``). Output
paths are checked before any computation and written atomically. Torch is imported only
when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ingest.arguments import finite, int_in, share

DTYPES = ("float32", "float64")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="compute the attribution graph of a prompt",
        description="Attribution graph of one prompt through transcoders (circuit tracing).",
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", required=True, help="model checkpoint directory or hub id")
    p.add_argument("--transcoders", required=True, type=Path, help="transcoder set directory")
    p.add_argument("--out", type=Path, default=None, help="write the full-graph artifact here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --json")
    p.add_argument("--json", type=Path, default=None, help="write circuit-tracer graph JSON")
    p.add_argument("--full-json", action="store_true", help="export the full graph, not pruned")
    p.add_argument("--graph-id", default=None, help="graph id (default: random)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="default: float32")
    p.add_argument(
        "--batch-size",
        type=int_in(1),
        default=64,
        help="target rows per backward pass; the frozen forward holds this many copies of "
        "the prompt's residual stream (n_layers + 1 tensors of batch x tokens x d_model)",
    )
    p.add_argument("--max-feature-nodes", type=int_in(0), default=None, help="expand at most N")
    p.add_argument("--max-n-logits", type=int_in(1), default=10, help="at most N target logits")
    p.add_argument("--desired-logit-prob", type=finite, default=0.95, help="cumulative prob")
    p.add_argument(
        "--logit-diff",
        nargs=2,
        metavar=("CORRECT", "COUNTERFACTUAL"),
        default=None,
        help="explain logit(CORRECT) - logit(COUNTERFACTUAL) instead (tokens; id:N for an id)",
    )
    p.add_argument(
        "--feature-target",
        nargs=3,
        type=int,
        metavar=("LAYER", "INDEX", "POS"),
        default=None,
        help="explain one transcoder feature's pre-activation instead",
    )
    p.add_argument("--node-threshold", type=share, default=0.8, help="pruning, 0..1 (0.8)")
    p.add_argument("--edge-threshold", type=share, default=0.98, help="pruning, 0..1 (0.98)")
    p.add_argument(
        "--threads", type=int_in(1), default=None, help="torch CPU threads (1 suits small models)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_attribute)


def _attribute(args: argparse.Namespace) -> int:
    from ingest.errors import InvalidArgumentError, NotFoundError
    from ingest.paths import check_output

    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None and path.exists() and not args.overwrite:
            raise InvalidArgumentError(
                f"{path} already exists: choose another {flag} or pass --overwrite"
            )
    if args.out is not None:
        check_output(args.out, "--out", directory=True)
    if args.json is not None:
        check_output(args.json, "--json", directory=False)
    if args.out is not None and args.json is not None:
        out, js = args.out.resolve(), args.json.resolve()
        if js == out or out in js.parents:
            raise InvalidArgumentError(
                f"--json {args.json} is --out's directory or inside it, which the artifact "
                "replaces: write the JSON elsewhere"
            )
    if not args.transcoders.exists():
        raise NotFoundError(f"no transcoder set at {args.transcoders}: check the path")

    import torch

    from ingest.attribution.artifact import save_artifact
    from ingest.attribution.attribute import attribute
    from ingest.attribution.export import export_circuit_tracer_json
    from ingest.attribution.prompts import single_token_id
    from ingest.attribution.targets import FeatureTarget, LogitDiffTarget, LogitTargets, Target
    from ingest.models import load_model
    from ingest.transcoders.formats import load_any

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    loaded = load_model(args.model, device=args.device, dtype=dtype, progress=not args.no_progress)
    transcoders = load_any(args.transcoders)
    target: Target = LogitTargets(args.max_n_logits, args.desired_logit_prob)
    if args.logit_diff is not None and args.feature_target is not None:
        raise InvalidArgumentError("give at most one of --logit-diff and --feature-target")
    if args.feature_target is not None:
        target = FeatureTarget(*args.feature_target)
    if args.logit_diff is not None:
        correct, counter = (
            single_token_id(loaded.tokenizer, text, flag)
            for text, flag in zip(args.logit_diff, ("CORRECT", "COUNTERFACTUAL"), strict=True)
        )
        target = LogitDiffTarget(correct, counter)
    result = attribute(
        loaded,
        transcoders,
        args.prompt,
        target=target,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        graph_id=args.graph_id,
        progress=not args.no_progress,
    )
    pruned = result.to_graph(
        pruned=True, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold
    )
    if args.out is not None:
        save_artifact(result, args.out, overwrite=args.overwrite)
    if args.json is not None:
        graph = result.to_graph(pruned=False) if args.full_json else pruned
        export_circuit_tracer_json(graph, args.json, transcoder_list=[str(args.transcoders)])
    stats = result.stats
    meta = pruned.metadata
    print(f"graph {result.metadata.graph_id}: {len(result.metadata.tokens)} tokens")
    print(
        f"full: {result.n_nodes} nodes ({stats['n_active_features']} active features, "
        f"{_count(result.layout.n_logits, 'target')}), "
        f"{int((result.adjacency != 0).sum())} edges; "
        f"{stats['n_backward_passes']} backward passes in {stats['seconds']:.2f}s"
    )
    print(
        f"pruned: {pruned.n_nodes} nodes, {pruned.n_edges} edges, "
        f"replacement {meta.replacement_score:.3f}, completeness {meta.completeness_score:.3f}"
    )
    if args.out is not None:
        print(f"artifact: {args.out}")
    if args.json is not None:
        print(f"json: {args.json}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
