"""The gRPC server's configuration: one typed, validated value per process.

Built in the entry point only (``service/serve_cli.py``) from flags and environment;
everything below it receives a :class:`ServerConfig` and reads nothing from the
environment. Validation happens on construction, with messages that say what to fix.

Auth: bearer tokens come from ``CIRCUITSCOPE_TOKENS`` (comma-separated) or a file (one
token per line, ``#`` comments); see :func:`load_tokens`. A server with no tokens
accepts every caller, so it may only listen on a loopback address unless
``allow_unauthenticated`` says otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import InvalidArgumentError, NotFoundError
from service.models import ModelSpec

TOKENS_ENV = "CIRCUITSCOPE_TOKENS"
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# About 105-130 bytes per edge or node in memory (docs/service.md): ~300-400 MB when full.
DEFAULT_GRAPH_CACHE_EDGES = 3_000_000
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when ``host`` names a loopback interface (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_tokens(env_value: str | None, tokens_file: Path | None) -> frozenset[str]:
    """Bearer tokens from a comma-separated env value and/or a file (one per line)."""
    tokens: set[str] = set()
    if env_value:
        tokens.update(t.strip() for t in env_value.split(",") if t.strip())
    if tokens_file is not None:
        if not tokens_file.is_file():
            raise NotFoundError(
                f"tokens file {tokens_file} does not exist; create it with one token per line"
            )
        for line in tokens_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.add(line)
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise InvalidArgumentError(
            f"{len(short)} bearer token(s) shorter than 16 characters; use long random tokens "
            "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return frozenset(tokens)


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS material (PEM bytes); ``client_ca`` set means mutual TLS is required."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path | None = None) -> TlsConfig:
        for path in (cert, key, client_ca):
            if path is not None and not path.is_file():
                raise NotFoundError(f"TLS file {path} does not exist; pass an existing PEM file")
        return cls(
            cert_chain=cert.read_bytes(),
            private_key=key.read_bytes(),
            client_ca=client_ca.read_bytes() if client_ca is not None else None,
        )


@dataclass(frozen=True)
class ServerConfig:
    """Everything the gRPC server needs to start.

    ``port`` 0 picks a free port (the bound port is reported by the running server).
    ``health_interval_s`` is how often the store's reachability is checked;
    ``default_timeout_s`` bounds store queries of calls that carry no deadline;
    ``workers`` is the size of the thread pool blocking store calls run in;
    ``model_workers`` the size of the pool model (torch) work runs in;
    ``models`` the models AnalysisService and JobService compute on;
    ``artifacts_dir`` where ingest jobs keep graph artifacts (None:
    ``ingest.paths.home()/artifacts``);
    ``graph_cache_edges`` the budget of the in-memory graph cache, in edges plus nodes
    of the cached graphs (0 disables it; ``service/graph_cache.py``);
    ``graph_cache_revalidate_s`` how stale a cached graph may be: its revision is
    re-checked against the store at least this often (0: on every call);
    ``subgraph_memo_edges`` how many nodes plus edges of GetSubgraph answers the cache
    remembers (0: none);
    ``list_cache_ttl_s`` how long a ListGraphs page may be served from memory (0: never;
    ``service/listing_cache.py``).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tokens: frozenset[str] = field(default_factory=frozenset)
    tls: TlsConfig | None = None
    allow_unauthenticated: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    health_interval_s: float = 5.0
    default_timeout_s: float = 30.0
    workers: int = 16
    model_workers: int = 1
    grace_s: float = 5.0
    models: tuple[ModelSpec, ...] = ()
    artifacts_dir: Path | None = None
    graph_cache_edges: int = DEFAULT_GRAPH_CACHE_EDGES
    graph_cache_revalidate_s: float = 1.0
    subgraph_memo_edges: int = 250_000
    list_cache_ttl_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgumentError(f"port {self.port} is outside 0..65535")
        if not self.tokens and not is_loopback(self.host) and not self.allow_unauthenticated:
            raise InvalidArgumentError(
                f"refusing to listen on {self.host} without bearer tokens; set "
                f"{TOKENS_ENV} or --tokens-file, or listen on 127.0.0.1"
            )
        if self.max_message_bytes < 1024:
            raise InvalidArgumentError("max_message_bytes must be at least 1024")
        for name in ("health_interval_s", "default_timeout_s", "grace_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.workers < 1 or self.model_workers < 1:
            raise InvalidArgumentError("workers and model_workers must be >= 1")
        for name, zero in (
            ("graph_cache_edges", "disables the cache"),
            ("subgraph_memo_edges", "remembers no answers"),
            ("graph_cache_revalidate_s", "checks on every call"),
            ("list_cache_ttl_s", "disables it"),
        ):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(
                    f"{name} must be >= 0 (0 {zero}), got {getattr(self, name)}"
                )

    @property
    def address(self) -> str:
        return self.address_on(self.port)

    def address_on(self, port: int) -> str:
        """``host:port`` for ``port`` (the bound one when ``port`` was 0), IPv6 bracketed."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{port}"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)
