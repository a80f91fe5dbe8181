"""Configuration of the graph store connection.

One typed config per process (STYLE habit 7), built from the environment in entry
points with :meth:`StoreConfig.from_env`:

- ``NEO4J_URI`` (e.g. ``bolt://db:7687``, ``neo4j+s://x.databases.neo4j.io``): use that
  server. Unset: start or reuse the embedded ArcadeDB Bolt server whose data lives in
  ``data_dir`` (default ``ingest.paths.home()/db``).
- ``NEO4J_USER`` (default ``neo4j``), ``NEO4J_PASSWORD``, ``NEO4J_DATABASE`` (default
  ``neo4j``; the embedded server's database is ``circuitscope``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import InvalidArgumentError

EMBEDDED_DATABASE = "circuitscope"
DEFAULT_BATCH_SIZE = 10_000
#: the most rows one UNWIND may carry
MAX_BATCH_SIZE = 1_000_000


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless told otherwise."""
    from ingest.paths import home

    return home() / "db"


def data_dir_flag(data_dir: Path | None) -> str:
    """`` --data-dir DIR`` for a command line, or "" for the default directory."""
    if data_dir is None or data_dir.resolve() == default_data_dir().resolve():
        return ""
    return f" --data-dir {data_dir}"


@dataclass(frozen=True)
class StoreConfig:
    """How to reach the graph store.

    ``uri`` None means the embedded server in ``data_dir``. The repr leaves out the
    password (use :meth:`redacted` to describe the store). ``query_timeout_s`` is the
    default per-transaction time limit (each call may pass its own, e.g. a gRPC
    deadline); ``connect_timeout_s`` bounds connecting and the readiness check.
    ``retry_time_s`` is how long the store keeps retrying a transaction that failed
    transiently (a dropped connection, a deadlock) before the call fails; callers that
    must outlast an outage (the ingest worker) wait it out themselves.
    """

    uri: str | None = None
    user: str = "neo4j"
    # out of the repr: a printed config (a notebook cell's output) must not show it
    password: str | None = field(default=None, repr=False)
    database: str = "neo4j"
    data_dir: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    query_timeout_s: float | None = 60.0
    connect_timeout_s: float = 10.0
    retry_time_s: float = 5.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.query_timeout_s is not None and self.query_timeout_s <= 0:
            raise InvalidArgumentError(
                f"query_timeout_s must be > 0 or None, got {self.query_timeout_s}"
            )
        if not 0 <= self.retry_time_s < math.inf:
            raise InvalidArgumentError(
                f"retry_time_s must be a finite number >= 0, got {self.retry_time_s}"
            )
        if not self.database:
            raise InvalidArgumentError("the database name must not be empty")

    @property
    def embedded(self) -> bool:
        return self.uri is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> StoreConfig:
        """Build the config from ``NEO4J_*`` variables; keyword overrides win."""
        env = os.environ if environ is None else environ
        # the database's default follows the URI in use, also one given as an override
        uri = overrides["uri"] if "uri" in overrides else env.get("NEO4J_URI") or None
        values: dict[str, object] = {
            "uri": uri,
            "user": env.get("NEO4J_USER") or "neo4j",
            "password": env.get("NEO4J_PASSWORD") or None,
            "database": env.get("NEO4J_DATABASE") or ("neo4j" if uri else EMBEDDED_DATABASE),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def describe(self, reached: StoreConfig) -> str:
        """The store this config asked for, once opened as ``reached``, for a command's
        first line: the embedded server is started on demand and outlives the command,
        so the line says how to stop it."""
        if self.embedded:
            where = data_dir_flag(reached.data_dir)
            return (
                f"the embedded server at {reached.uri}, data in {reached.data_dir} (it keeps "
                f"running for later commands; `circuitscope db stop{where}` stops it)"
            )
        return reached.redacted()

    def redacted(self) -> str:
        """A description safe to log (no password)."""
        where = self.uri or f"embedded server in {self.data_dir or default_data_dir()}"
        return f"{where} (database {self.database!r}, user {self.user!r})"
