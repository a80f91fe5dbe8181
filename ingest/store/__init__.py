"""The graph store: attribution graphs and the feature catalog in a Bolt graph database.

One entry point, :func:`open_store`, returns a :class:`~ingest.store.base.GraphStore`:

- ``NEO4J_URI`` set (or ``config.uri``): that server, Neo4j 5 in production;
- otherwise the embedded ArcadeDB Bolt server, started (or reused) in a separate
  process with its data in ``ingest.paths.home()/db`` (:mod:`ingest.store.embedded`);
  it outlives the store (``ingest.store.embedded.stop()`` stops it).

Importing this package is cheap: the driver is imported when a store is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingest.store.config import StoreConfig

if TYPE_CHECKING:
    from ingest.store.base import GraphStore

__all__ = ["StoreConfig", "open_store"]


def open_store(config: StoreConfig | None = None, *, ensure_schema: bool = True) -> GraphStore:
    """Connect to the configured graph store, checking it answers.

    ``config`` defaults to :meth:`StoreConfig.from_env`. Raises UnavailableError, saying
    what to do, when the server cannot be reached. Close the store (or use it as a
    context manager) when done.

    With no uri (no ``NEO4J_URI``), the embedded server of ``config.data_dir`` (default
    ``$CIRCUITSCOPE_HOME/db``) is started, a JVM with a heap of ``CIRCUITSCOPE_DB_HEAP``
    (default 2g), or reused. It runs in its own process and keeps running after the
    store is closed, for later stores and ``circuitscope`` commands to reuse: stop it
    with ``ingest.store.embedded.stop(data_dir)`` (or ``circuitscope db stop``), or open
    the store inside ``with ingest.store.embedded.embedded_server(data_dir) as config:``,
    which stops it when the block ends.
    """
    from ingest.store.bolt import BoltGraphStore
    from ingest.store.embedded import with_server

    config = config or StoreConfig.from_env()
    if config.uri is None:
        config = with_server(config)
    store = BoltGraphStore(config)
    try:
        store.verify()
        if ensure_schema:
            store.ensure_schema()
    except BaseException:
        store.close()
        raise
    return store
