"""``circuitscope query ...``: call a running server with :class:`CircuitsClient`.

Subcommands mirror the RPCs (``graphs list|get|subgraph|paths``, ``features
get|search|label|occurrences``, ``health``) and print JSON on stdout. The target comes
from ``--target`` or ``CIRCUITSCOPE_TARGET`` (default ``localhost:50051``), the bearer
token from ``--token-file`` or ``CIRCUITSCOPE_TOKEN``; ``--tls-ca`` switches to TLS,
``--tls-cert``/``--tls-key`` add a client certificate for mutual TLS. Failed calls
raise domain errors, which the console script prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

TARGET_ENV = "CIRCUITSCOPE_TARGET"
TOKEN_ENV = "CIRCUITSCOPE_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "query",
        help="query a running circuitscope gRPC server",
        description="Call the circuits.v1 API of a running server and print JSON.",
    )
    parser.add_argument("--target", help=f"host:port (default ${TARGET_ENV} or localhost:50051)")
    parser.add_argument("--token-file", type=Path, help=f"bearer token file (default ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="use TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--tls-key", type=Path, help="client private key for mutual TLS (PEM)")
    parser.add_argument("--server-name", help="TLS server name to verify, if not the target host")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline (seconds)")
    groups = parser.add_subparsers(dest="query_group", metavar="GROUP", required=True)

    graphs = groups.add_parser("graphs", help="stored attribution graphs").add_subparsers(
        dest="query_command", metavar="COMMAND", required=True
    )
    p = graphs.add_parser("list", help="list graphs, one page")
    p.add_argument("--model", default="", help="model id filter")
    p.add_argument("--task", default="", help="task filter")
    p.add_argument("--prompt-contains", default="", help="prompt text filter")
    p.add_argument("--newest-first", action="store_true", help="order newest first")
    _paging(p, _graphs_list)
    p = graphs.add_parser("get", help="one graph with nodes and edges")
    p.add_argument("graph_id")
    p.add_argument("--stream", action="store_true", help="receive it as a stream of edge chunks")
    p.set_defaults(handler=_graphs_get)
    p = graphs.add_parser("subgraph", help="the neighbourhood of a node")
    p.add_argument("graph_id")
    p.add_argument("node_id")
    p.add_argument("--depth", type=int, default=0, help="hops (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="edges kept per node (default 10)")
    p.add_argument("--direction", choices=("both", "out", "in"), default="both")
    p.set_defaults(handler=_graphs_subgraph)
    p = graphs.add_parser("paths", help="strongest paths between two nodes")
    p.add_argument("graph_id")
    p.add_argument("source_node_id")
    p.add_argument("target_node_id")
    p.add_argument("--top-k", type=int, default=0, help="paths (default 5)")
    p.add_argument("--max-length", type=int, default=0, help="edges per path (default 6)")
    p.add_argument("--score", choices=("product", "sum"), default="product")
    p.set_defaults(handler=_graphs_paths)

    features = groups.add_parser("features", help="the feature catalog").add_subparsers(
        dest="query_command", metavar="COMMAND", required=True
    )
    p = features.add_parser("get", help="one feature")
    _feature_key(p)
    p.set_defaults(handler=_features_get)
    p = features.add_parser("search", help="search features of a transcoder set, one page")
    p.add_argument("set_id")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--label", default="", help="label text filter")
    p.add_argument("--token", default="", help="top-token filter")
    _paging(p, _features_search)
    p = features.add_parser("label", help="set (or clear with '') a feature's label")
    _feature_key(p)
    p.add_argument("label")
    p.set_defaults(handler=_features_label)
    p = features.add_parser("occurrences", help="graphs where a feature is active, one page")
    _feature_key(p)
    _paging(p, _features_occurrences)

    p = groups.add_parser("health", help="the server's health status")
    p.add_argument("service", nargs="?", default="", help="service name ('' for the server)")
    p.set_defaults(handler=_health)


def _paging(parser: argparse.ArgumentParser, handler: Any) -> None:
    parser.add_argument("--page-size", type=int, default=0, help="items per page (default 50)")
    parser.add_argument("--page-token", default="", help="next_page_token of the previous page")
    parser.set_defaults(handler=handler)


def _feature_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("set_id")
    parser.add_argument("layer", type=int)
    parser.add_argument("index", type=int)


def make_client(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Any:
    """A :class:`CircuitsClient` for the connection flags and environment."""
    from ingest.errors import NotFoundError
    from service.client import CircuitsClient, ClientTls

    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV) or None
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise NotFoundError(f"token file {args.token_file} does not exist")
        token = args.token_file.read_text().strip()
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    target = args.target or env.get(TARGET_ENV) or "localhost:50051"
    return CircuitsClient(target, token=token, tls=tls, timeout_s=args.timeout)


def _jsonable(value: Any) -> Any:
    from ingest.graph import AttributionGraph

    if isinstance(value, AttributionGraph):
        return {
            "metadata": _jsonable(value.metadata),
            "nodes": [_jsonable(n) for n in value.nodes],
            "edges": [{"source": s, "target": t, "weight": w} for s, t, w in value.edge_list()],
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _emit(value: Any) -> int:
    sys.stdout.write(json.dumps(_jsonable(value), indent=2) + "\n")
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
