"""``circuitscope query ...``: call a running server with :class:`CircuitsClient`.

Subcommands mirror the RPCs (``graphs list|get|subgraph|paths``, ``features
get|search|label|occurrences``, ``models``, ``attribute``, ``intervene``,
``evaluate``, ``jobs
submit|list|get|watch|cancel``, ``health``) and print JSON on stdout. The target comes
from ``--target`` or ``CIRCUITSCOPE_TARGET`` (default ``localhost:50051``), the bearer
token from ``--token-file`` or ``CIRCUITSCOPE_TOKEN``; ``--tls-ca`` switches to TLS,
``--tls-cert``/``--tls-key`` (both or neither) add a client certificate for mutual
TLS. Failed calls raise domain errors, which the console script prints as one line
(exit 2).

Numbers are checked before anything is sent: integers must fit the request's field
(argparse refuses others, exit 2) and floats must be finite. The JSON on stdout is
strict (RFC 8259): a non-finite number in an answer is written as ``null``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ingest.arguments import finite, int_in, token_id
from ingest.paths import model_id

TARGET_ENV = "CIRCUITSCOPE_TARGET"
TOKEN_ENV = "CIRCUITSCOPE_TOKEN"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


_count = int_in(0, INT32_MAX)  # layers and positions (int32 fields)
# Sizes and depths: the API reads 0 as "the default", so a 0 typed on the command line
# is refused rather than silently replaced; leaving the flag out asks for the default.
_size = int_in(1, INT32_MAX)
_id = int_in(0, INT64_MAX)  # feature indices and token ids (int64 fields)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "query",
        help="query a running circuitscope gRPC server",
        description="Call the circuits.v1 API of a running server and print JSON.",
    )
    parser.add_argument("--target", help=f"host:port (default ${TARGET_ENV} or localhost:50051)")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token (default: the token in ${TOKEN_ENV})",
    )
    parser.add_argument("--tls-ca", type=Path, help="use TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--tls-key", type=Path, help="client private key for mutual TLS (PEM)")
    parser.add_argument("--server-name", help="TLS server name to verify, if not the target host")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline (seconds)")
    parser.set_defaults(handler=_run)
    groups = parser.add_subparsers(dest="query_group", metavar="GROUP", required=True)

    graphs = groups.add_parser("graphs", help="stored attribution graphs").add_subparsers(
        dest="query_command", metavar="COMMAND", required=True
    )
    p = graphs.add_parser("list", help="list graphs, one page")
    p.add_argument(
        "--model",
        type=model_id,
        default="",
        help="model id filter: a hub id, or a local model directory (matched by its "
        "absolute path, the id ingest stores)",
    )
    p.add_argument("--task", default="", help="task filter")
    p.add_argument("--prompt-contains", default="", help="prompt text filter")
    p.add_argument("--newest-first", action="store_true", help="order newest first")
    _paging(p, _graphs_list)
    p = graphs.add_parser("get", help="one graph with nodes and edges")
    p.add_argument("graph_id")
    p.add_argument("--stream", action="store_true", help="receive it as a stream of edge chunks")
    p.set_defaults(query_handler=_graphs_get)
    p = graphs.add_parser("subgraph", help="the neighbourhood of a node")
    p.add_argument("graph_id")
    p.add_argument("node_id")
    p.add_argument("--depth", type=_size, default=0, help="hops (default 1)")
    p.add_argument("--top-k", type=_size, default=0, help="edges kept per node (default 10)")
    p.add_argument("--direction", choices=("both", "out", "in"), default="both")
    p.set_defaults(query_handler=_graphs_subgraph)
    p = graphs.add_parser("paths", help="strongest paths between two nodes")
    p.add_argument("graph_id")
    p.add_argument("source_node_id")
    p.add_argument("target_node_id")
    p.add_argument("--top-k", type=_size, default=0, help="paths (default 5)")
    p.add_argument("--max-length", type=_size, default=0, help="edges per path (default 6)")
    p.add_argument("--score", choices=("product", "sum"), default="product")
    p.set_defaults(query_handler=_graphs_paths)

    features = groups.add_parser("features", help="the feature catalog").add_subparsers(
        dest="query_command", metavar="COMMAND", required=True
    )
    p = features.add_parser("get", help="one feature")
    _feature_key(p)
    p.set_defaults(query_handler=_features_get)
    p = features.add_parser("search", help="search features of a transcoder set, one page")
    p.add_argument("set_id")
    p.add_argument("--layer", type=_count, default=None)
    p.add_argument("--label", default="", help="label text filter")
    p.add_argument("--token", default="", help="top-token filter")
    _paging(p, _features_search)
    p = features.add_parser("label", help="set (or clear with '') a feature's label")
    _feature_key(p)
    p.add_argument("label")
    p.set_defaults(query_handler=_features_label)
    p = features.add_parser("occurrences", help="graphs where a feature is active, one page")
    _feature_key(p)
    _paging(p, _features_occurrences)

    p = groups.add_parser(
        "models",
        help="the models the server analyses on request, with the model and set ids "
        "their stored graphs carry",
    )
    p.set_defaults(query_handler=_models)
    p = groups.add_parser("attribute", help="compute a prompt's pruned attribution graph")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument(
        "--logit-diff",
        nargs=2,
        type=token_id,
        metavar=("id:CORRECT", "id:COUNTER"),
        help="explain logit(CORRECT) - logit(COUNTER) instead: token ids, as id:N",
    )
    p.add_argument("--max-feature-nodes", type=_size, default=None)
    p.add_argument("--node-threshold", type=finite, default=None)
    p.add_argument("--edge-threshold", type=finite, default=None)
    p.set_defaults(query_handler=_attribute)

    p = groups.add_parser("intervene", help="next-token predictions with features changed")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument(
        "--set",
        nargs=4,
        action="append",
        default=[],
        metavar=("LAYER", "INDEX", "POS", "VALUE"),
        help="set a feature's activation (repeatable); the order of node ids LAYER_INDEX_POS",
    )
    p.add_argument(
        "--scale",
        nargs=4,
        action="append",
        default=[],
        metavar=("LAYER", "INDEX", "POS", "FACTOR"),
        help="scale a feature's activation; 0 ablates it (repeatable)",
    )
    p.add_argument("--freeze-attention", action="store_true")
    p.add_argument("--top-k", type=_size, default=0, help="next tokens shown (default 10)")
    p.set_defaults(query_handler=_intervene)
    p = groups.add_parser("evaluate", help="circuit faithfulness f(k), CPR and CMD (MIB)")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("counterfactual", help="a prompt of the same token length")
    p.add_argument("correct_token_id", type=_id)
    p.add_argument("counterfactual_token_id", type=_id)
    p.add_argument(
        "--scoring",
        choices=("attribution", "weight", "random", "eap", "eap_signed"),
        default="attribution",
        help="how edges are ranked (default: attribution)",
    )
    p.add_argument(
        "--patching",
        choices=("edge", "node"),
        default="edge",
        help="edge: MIB edge patching in the linearized model; node: node patching",
    )
    p.add_argument("--fractions", type=finite, nargs="+", default=None)
    p.set_defaults(query_handler=_evaluate)

    jobs = groups.add_parser("jobs", help="ingest jobs").add_subparsers(
        dest="query_command", metavar="COMMAND", required=True
    )
    p = jobs.add_parser("submit", help="queue an ingest job from a JSON Lines prompt file")
    p.add_argument("model")
    p.add_argument("prompts", type=Path, help="JSONL: one {prompt, task, id, ...} per line")
    p.add_argument("--node-threshold", type=finite, default=None)
    p.add_argument("--edge-threshold", type=finite, default=None)
    p.add_argument("--watch", action="store_true", help="follow the job until it finishes")
    p.set_defaults(query_handler=_jobs_submit)
    p = jobs.add_parser("list", help="list jobs, most recent first, one page")
    p.add_argument(
        "--state",
        default="",
        choices=("", "queued", "running", "succeeded", "failed", "cancelled"),
        help="state filter",
    )
    p.add_argument("--model", default="", help="served model filter")
    _paging(p, _jobs_list)
    for name, handler, text in (
        ("get", _jobs_get, "a job's state"),
        ("watch", _jobs_watch, "follow a job until it finishes"),
        ("cancel", _jobs_cancel, "cancel a job"),
    ):
        p = jobs.add_parser(name, help=text)
        p.add_argument("job_id")
        p.set_defaults(query_handler=handler)

    p = groups.add_parser("health", help="the server's health status")
    p.add_argument("service", nargs="?", default="", help="service name ('' for the server)")
    p.set_defaults(query_handler=_health)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen query; a rejected token gets the command line's own advice."""
    from ingest.errors import UnauthenticatedError

    try:
        return int(args.query_handler(args))
    except UnauthenticatedError as exc:
        raise UnauthenticatedError(
            f"{exc} (from the command line: --token-file FILE, or the token itself in ${TOKEN_ENV})"
        ) from None


def _paging(parser: argparse.ArgumentParser, handler: Any) -> None:
    parser.add_argument("--page-size", type=_size, default=0, help="items per page (default 50)")
    parser.add_argument("--page-token", default="", help="next_page_token of the previous page")
    parser.set_defaults(query_handler=handler)


def _feature_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("set_id")
    parser.add_argument("layer", type=_count)
    parser.add_argument("index", type=_id)


def _read_token(path: Path) -> str:
    """The one bearer token in ``path``, read as the server reads its tokens file: a
    ``#`` starts a comment, blank lines are skipped."""
    from ingest.errors import InvalidArgumentError

    tokens = [t for line in path.read_text().splitlines() if (t := line.split("#", 1)[0].strip())]
    if len(tokens) != 1:
        raise InvalidArgumentError(
            f"token file {path} holds {len(tokens)} tokens (outside # comments): the client "
            "sends one, so pass a file that holds exactly one"
        )
    if any(c.isspace() for c in tokens[0]):
        raise InvalidArgumentError(f"the token in {path} contains whitespace: a token is one word")
    return tokens[0]


def make_client(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Any:
    """A :class:`CircuitsClient` for the connection flags and environment."""
    from ingest.errors import InvalidArgumentError, NotFoundError
    from service.client import CircuitsClient, ClientTls

    env = os.environ if environ is None else environ
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InvalidArgumentError(f"--timeout must be > 0 seconds and finite, got {args.timeout}")
    token = env.get(TOKEN_ENV) or None
    if args.token_file is not None:
        if args.token_file.is_dir():
            raise InvalidArgumentError(
                f"--token-file {args.token_file} is a directory: pass the file holding the token"
            )
        if not args.token_file.is_file():
            raise NotFoundError(f"token file {args.token_file} does not exist")
        token = _read_token(args.token_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgumentError(
            "--tls-cert and --tls-key go together (the client certificate and its private "
            "key, for mutual TLS): give both, or neither"
        )
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    elif args.server_name:
        raise InvalidArgumentError(
            "--server-name only applies to TLS: add --tls-ca (or --tls-cert and --tls-key)"
        )
    target = args.target or env.get(TARGET_ENV) or "localhost:50051"
    _check_target(target)
    return CircuitsClient(target, token=token, tls=tls, timeout_s=args.timeout)


def _check_target(target: str) -> None:
    """Refuse a ``host:port`` whose port is out of range (gRPC would wrap it silently)."""
    from ingest.errors import InvalidArgumentError

    _, colon, port = target.rpartition(":")
    if colon and port.isdigit() and not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(f"target {target!r}: the port must lie in 1..65535, got {port}")


def _jsonable(value: Any) -> Any:
    """``value`` as JSON types; non-finite floats become None (strict JSON has no NaN)."""
    from ingest.graph import AttributionGraph

    if isinstance(value, AttributionGraph):
        return {
            "metadata": _jsonable(value.metadata),
            "nodes": [_jsonable(n) for n in value.nodes],
            "edges": [
                {"source": s, "target": t, "weight": _jsonable(w)} for s, t, w in value.edge_list()
            ],
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _emit(value: Any) -> int:
    sys.stdout.write(json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n")
    return 0


def _page(page: Any) -> dict[str, Any]:
    return {"items": page.items, "next_page_token": page.next_cursor or ""}


def _graphs_list(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(
            _page(
                c.list_graphs(
                    model_id=args.model,
                    task=args.task,
                    prompt_contains=args.prompt_contains,
                    page_size=args.page_size,
                    page_token=args.page_token,
                    newest_first=args.newest_first,
                )
            )
        )


def _graphs_get(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.stream_graph(args.graph_id) if args.stream else c.get_graph(args.graph_id))


def _graphs_subgraph(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        sub = c.get_subgraph(
            args.graph_id,
            args.node_id,
            depth=args.depth,
            top_k=args.top_k,
            direction=args.direction,
        )
        return _emit({"nodes": sub.nodes, "edges": _jsonable(sub)["edges"]})


def _graphs_paths(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(
            c.find_paths(
                args.graph_id,
                args.source_node_id,
                args.target_node_id,
                top_k=args.top_k,
                max_length=args.max_length,
                score=args.score,
            )
        )


def _features_get(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.get_feature(args.set_id, args.layer, args.index))


def _features_search(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        page = c.search_features(
            args.set_id,
            layer=args.layer,
            label_contains=args.label,
            token=args.token,
            page_size=args.page_size,
            page_token=args.page_token,
        )
        return _emit(_page(page))


def _features_label(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.set_feature_label(args.set_id, args.layer, args.index, args.label))


def _features_occurrences(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        page = c.feature_occurrences(
            args.set_id,
            args.layer,
            args.index,
            page_size=args.page_size,
            page_token=args.page_token,
        )
        return _emit(_page(page))


def _health(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        status = c.health(args.service)
        sys.stdout.write(status + "\n")
        return 0 if status == "SERVING" else 3


def _models(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.served_models())


def _attribute(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        result = c.attribute(
            args.model,
            args.prompt,
            logit_diff=tuple(args.logit_diff) if args.logit_diff else None,
            max_feature_nodes=args.max_feature_nodes,
            node_threshold=args.node_threshold,
            edge_threshold=args.edge_threshold,
        )
        return _emit(result)


def _intervene(args: argparse.Namespace) -> int:
    from ingest.errors import InvalidArgumentError

    changes: list[tuple[int, int, int, str, float]] = []
    for kind, specs in (("value", args.set), ("scale", args.scale)):
        for layer, index, pos, number in specs:
            flag = "--set" if kind == "value" else "--scale"
            try:
                change = (_count(layer), _count(pos), _id(index), kind, finite(number))
            except argparse.ArgumentTypeError as exc:
                raise InvalidArgumentError(
                    f"{flag} takes LAYER INDEX POS NUMBER (a finite number): {exc}"
                ) from None
            changes.append(change)
    with make_client(args) as c:
        return _emit(
            c.intervene(
                args.model,
                args.prompt,
                changes,
                freeze_attention=args.freeze_attention,
                top_k=args.top_k,
            )
        )


def _evaluate(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(
            c.evaluate_circuit(
                args.model,
                args.prompt,
                args.counterfactual,
                args.correct_token_id,
                args.counterfactual_token_id,
                scoring=args.scoring,
                patching=args.patching,
                fractions=args.fractions,
            )
        )


def _read_prompt_file(path: Path) -> list[dict[str, str]]:
    """The prompt file as worker records, read as the ingest worker reads it (unset
    fields left out); any bad line is refused, naming it, before anything is sent."""
    from ingest.errors import InvalidArgumentError
    from ingest.worker.prompts import BadLine, read_prompts

    records, bad = [], []
    for item in read_prompts(path):
        if isinstance(item, BadLine):
            bad.append(str(item))
            continue
        records.append(item.record())
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InvalidArgumentError(
            f"{path}: {len(bad)} bad line(s): {'; '.join(bad[:5])}{more}; fix them and submit again"
        )
    return records


def _watch(client: Any, job_id: str) -> int:
    last = None
    for last in client.watch_job(job_id):
        sys.stderr.write(f"job {job_id}: {last.state} {last.processed_count}/{last.prompt_count}\n")
    _emit(last)
    return 0 if last is not None and last.state == "succeeded" else 3


def _jobs_submit(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        job = c.submit_ingest(
            args.model,
            _read_prompt_file(args.prompts),
            node_threshold=args.node_threshold,
            edge_threshold=args.edge_threshold,
        )
        return _watch(c, job.job_id) if args.watch else _emit(job)


def _jobs_list(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        page = c.list_jobs(
            state=args.state, model=args.model, page_size=args.page_size, page_token=args.page_token
        )
    # ListJobs leaves out graph ids and errors (jobs get has them): not shown as empty lists
    listed = _page(page)
    listed["items"] = [
        {k: v for k, v in _jsonable(job).items() if k not in ("graph_ids", "errors")}
        for job in page.items
    ]
    return _emit(listed)


def _jobs_get(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.get_job(args.job_id))


def _jobs_watch(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _watch(c, args.job_id)


def _jobs_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as c:
        return _emit(c.cancel_job(args.job_id))
