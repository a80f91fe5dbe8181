"""``circuitscope serve``: run the gRPC server (and register ``circuitscope query``).

The entry point is the only place configuration is read from flags and environment:
``ServerConfig`` from the flags below and ``CIRCUITSCOPE_TOKENS``; ``StoreConfig`` from
``NEO4J_*`` (:meth:`StoreConfig.from_env`) and the ``--store-*`` flags. With no
``NEO4J_URI`` the embedded graph server is started or reused. Cheap to import: grpc
and the store are imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service import query_cli

if TYPE_CHECKING:
    from service.config import ServerConfig


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve",
        help="run the circuits.v1 gRPC server",
        description=(
            "Serve stored attribution graphs and the feature catalog over gRPC, with "
            "health, reflection, bearer-token auth (CIRCUITSCOPE_TOKENS or --tokens-file) "
            "and optional TLS / mutual TLS. Stops gracefully on SIGTERM."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    parser.add_argument("--tokens-file", type=Path, help="bearer tokens, one per line")
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow listening on a non-loopback address without tokens",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--client-ca", type=Path, help="require client certs from this CA (mTLS)")
    parser.add_argument("--workers", type=int, default=16, help="threads for store calls")
    parser.add_argument(
        "--max-message-mb", type=int, default=64, help="message size limit, both directions"
    )
    parser.add_argument(
        "--health-interval", type=float, default=5.0, help="seconds between store health probes"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=MODEL_DIR,TRANSCODERS_DIR",
        help="serve attribution on this model and transcoder set (repeatable)",
    )
    parser.add_argument("--device", default="cpu", help="device of served models (cpu, cuda)")
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        help="where ingest jobs keep graph artifacts (default $CIRCUITSCOPE_HOME/artifacts)",
    )
    parser.add_argument(
        "--graph-cache-edges",
        type=int,
        default=3_000_000,
        help="memory budget of the graph cache, in edges plus nodes (0 disables it)",
    )
    parser.add_argument(
        "--graph-cache-revalidate",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a cached graph is re-checked against the store at least this often; "
        "changes by other processes show within this bound (0: check on every call)",
    )
    parser.add_argument(
        "--subgraph-memo-edges",
        type=int,
        default=250_000,
        help="GetSubgraph answers remembered per graph revision, in nodes plus edges (0: none)",
    )
    parser.add_argument(
        "--list-cache-ttl",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="ListGraphs pages are served from memory for at most this long; graphs "
        "added or deleted by other processes show within this bound (0 disables it)",
    )
    parser.add_argument("--store-uri", help="Bolt URI of the graph store (default: NEO4J_URI)")
    parser.add_argument(
        "--store-data-dir", type=Path, help="data directory of the embedded graph server"
    )
    parser.add_argument(
        "--store-timeout", type=float, default=30.0, help="store query timeout (seconds)"
    )
    parser.set_defaults(handler=_serve)
    query_cli.register(subparsers)


def build_server_config(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    """The :class:`ServerConfig` for parsed ``serve`` flags and the environment."""
    from ingest.errors import InvalidArgumentError
    from ingest.paths import home
    from service.config import TOKENS_ENV, ServerConfig, TlsConfig, load_tokens
    from service.models import ModelSpec

    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgumentError("pass both --tls-cert and --tls-key, or neither")
    if args.client_ca is not None and args.tls_cert is None:
        raise InvalidArgumentError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = (
        TlsConfig.from_files(args.tls_cert, args.tls_key, args.client_ca)
        if args.tls_cert is not None
        else None
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        tokens=load_tokens(environ.get(TOKENS_ENV), args.tokens_file),
        tls=tls,
        allow_unauthenticated=args.allow_unauthenticated,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        health_interval_s=args.health_interval,
        default_timeout_s=args.store_timeout,
        workers=args.workers,
        models=tuple(ModelSpec.parse(m, args.device) for m in args.model),
        artifacts_dir=args.artifacts_dir or home() / "artifacts",
        graph_cache_edges=args.graph_cache_edges,
        graph_cache_revalidate_s=args.graph_cache_revalidate,
        list_cache_ttl_s=args.list_cache_ttl,
        subgraph_memo_edges=args.subgraph_memo_edges,
    )


def _say(line: str) -> None:
    sys.stderr.write(f"circuitscope: {line}\n")
    sys.stderr.flush()


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from ingest.processes import exit_now
    from ingest.store import StoreConfig, open_store
    from service.server import serve

    config = build_server_config(args, dict(os.environ))
    overrides: dict[str, object] = {"query_timeout_s": args.store_timeout}
    if args.store_uri:
        overrides["uri"] = args.store_uri
    if args.store_data_dir:
        overrides["data_dir"] = args.store_data_dir
    store_config = StoreConfig.from_env(None, **overrides)
    with open_store(store_config) as store:
        _say(f"graph store: {store_config.describe(store.config)}")
        if not asyncio.run(serve(config, store, announce=_say)):
            # A thread is still in a computation or a store call: the interpreter (and
            # closing the store under it) would wait for it, however long it takes. Its
            # ingest job resumes at the next start.
            _say("shutdown left busy threads behind; exiting without waiting for them")
            exit_now(0)
    return 0
