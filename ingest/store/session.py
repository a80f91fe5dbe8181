"""One Bolt connection to the graph store: sessions, transactions, error translation.

Every transaction names the database (Neo4j's guidance) and carries a timeout (the
config default or the caller's deadline). Driver exceptions become the domain errors
of :mod:`ingest.errors` with messages that say what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from neo4j import Driver, GraphDatabase, ManagedTransaction, unit_of_work
from neo4j import exceptions as neo4j_errors

from ingest.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from ingest.store import cypher
from ingest.store.config import EMBEDDED_DATABASE, StoreConfig

T = TypeVar("T")


def check_range(name: str, value: int, low: int, high: int) -> int:
    """``value`` when it is an int in [low, high]; InvalidArgumentError otherwise."""
    if not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def rows(records: Any) -> list[dict[str, Any]]:
    """A result's records as dicts."""
    return [r.data() for r in records]


class BoltConnection:
    """A driver for one database of one server, and the transactions run through it."""

    def __init__(self, config: StoreConfig, driver: Driver | None = None) -> None:
        if config.uri is None and driver is None:
            raise InvalidArgumentError(
                "a Bolt connection needs a server uri; use ingest.store.open_store(config), "
                "which starts the embedded server when no uri is set"
            )
        self.config = config
        self._driver = driver or GraphDatabase.driver(
            config.uri or "",
            auth=(config.user, config.password or ""),
            connection_timeout=config.connect_timeout_s,
            connection_acquisition_timeout=max(config.connect_timeout_s, 30.0),
            max_transaction_retry_time=config.retry_time_s,
        )

    @contextlib.contextmanager
    def translate_errors(self, what: str) -> Iterator[None]:
        """Translate driver errors into domain errors that say what to do."""
        try:
            yield
        except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired) as exc:
            # the driver retried the transaction for up to retry_time_s before this
            raise UnavailableError(
                f"graph store {self.config.redacted()} is unreachable while trying to {what} "
                f"({exc}); start it (`circuitscope db start`) or fix NEO4J_URI",
                retried_for_s=self.config.retry_time_s,
            ) from exc
        except neo4j_errors.AuthError as exc:
            raise UnavailableError(
                f"graph store {self.config.redacted()} rejected the credentials; "
                "check NEO4J_USER and NEO4J_PASSWORD"
            ) from exc
        except neo4j_errors.ConstraintError as exc:
            raise FailedPreconditionError(
                f"could not {what}: a uniqueness constraint was violated ({exc.message}); "
                "is another writer storing the same graph id?"
            ) from exc
        except neo4j_errors.CypherSyntaxError as exc:
            raise InvalidArgumentError(f"could not {what}: {exc.message}") from exc
        except neo4j_errors.DatabaseError as exc:
            # A server-side failure, e.g. the server shutting down under a transaction.
            # Writes are idempotent (a rerun repairs a half-written graph): retry.
            raise UnavailableError(
                f"graph store {self.config.redacted()} failed while trying to {what} "
                f"({exc.message}); it may be stopping or overloaded: retry"
            ) from exc
        except neo4j_errors.ClientError as exc:
            if exc.code == "Neo.ClientError.Database.DatabaseNotFound":
                raise UnavailableError(
                    f"graph store {self.config.redacted()}: the server has no such "
                    "database; fix NEO4J_DATABASE (the embedded server's database is "
                    f"{EMBEDDED_DATABASE!r}, Neo4j Community's 'neo4j')"
                ) from exc
            if exc.code == "Neo.ClientError.Statement.EntityNotFound":
                # ArcadeDB reads are not isolated from a concurrent delete: a graph being
                # rewritten or deleted under this query lost records it was reading.
                raise FailedPreconditionError(
                    f"could not {what}: the data changed under the query (a graph rewritten "
                    "or deleted meanwhile); retry"
                ) from exc
            if "not expected in state: AUTHENTICATION" in (exc.message or ""):
                # A server still starting (ArcadeDB's Bolt listener opens before its
                # security does) answers a fresh connection this way: retry later.
                raise UnavailableError(
                    f"graph store {self.config.redacted()} is still starting while trying "
                    f"to {what}; retry in a few seconds"
                ) from exc
            if "Timeout" in (exc.code or "") or "TimedOut" in (exc.code or ""):
                raise ResourceExhaustedError(
                    f"{what} ran past its time limit; narrow the query or raise the timeout"
                ) from exc
            raise

    def _timeout(self, timeout: float | None) -> float | None:
        return self.config.query_timeout_s if timeout is None else timeout

    def transaction(
        self,
        work: Callable[[ManagedTransaction], T],
        *,
        write: bool,
        timeout: float | None,
        what: str,
    ) -> T:
        fn = unit_of_work(timeout=self._timeout(timeout))(work)
        with (
            self.translate_errors(what),
            self._driver.session(database=self.config.database) as session,
        ):
            return session.execute_write(fn) if write else session.execute_read(fn)

    def read_rows(
        self, query: str, params: Mapping[str, Any], timeout: float | None, what: str
    ) -> list[dict[str, Any]]:
        return self.transaction(
            lambda tx: rows(tx.run(query, dict(params))), write=False, timeout=timeout, what=what
        )

    def write_rows(
        self, query: str, params: Mapping[str, Any], timeout: float | None, what: str
    ) -> list[dict[str, Any]]:
        return self.transaction(
            lambda tx: rows(tx.run(query, dict(params))), write=True, timeout=timeout, what=what
        )

    def verify(self) -> None:
        """Check the server answers and the database exists; UnavailableError otherwise."""
        with self.translate_errors("connect"):
            self._driver.verify_connectivity()
        self.read_rows("RETURN 1 AS ok", {}, self.config.connect_timeout_s, "reach the database")

    def close(self) -> None:
        self._driver.close()

    def ensure_schema(self) -> None:
        for statement in cypher.SCHEMA:
            with (
                self.translate_errors("create the schema"),
                self._driver.session(database=self.config.database) as session,
            ):
                session.run(statement).consume()
