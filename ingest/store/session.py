"""One Bolt connection to the graph store: sessions, transactions, error translation.

Every transaction names the database (Neo4j's guidance) and carries a timeout (the
config default or the caller's deadline). Driver exceptions become the domain errors
of :mod:`ingest.errors` with one-line messages that say what to do.

Retries are this module's, not the driver's (whose are turned off): a transaction that
fails in a way the driver calls retryable (a dropped connection, a deadlock, ArcadeDB's
conflicting change) is run again with the driver's backoff (1 s, doubling, 20 %
jitter) for up to ``retry_time_s``, each retry logged on one line at INFO; but not when
the embedded server the config points at is stopped, which only a start mends: that
fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
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
from ingest.store import cypher, embedded
from ingest.store.config import EMBEDDED_DATABASE, StoreConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: the driver's retry backoff: first pause (s), growth per retry, relative jitter
FIRST_PAUSE_S, PAUSE_GROWTH, PAUSE_JITTER = 1.0, 2.0, 0.2

#: what a client-side error of a statement (``Neo.ClientError.Statement.*``) means to
#: the caller, by the code's last part; others get the last entry's advice
_STATEMENT_ADVICE = {
    "ParameterMissing": "pass a value for every $parameter the query uses",
    "TypeError": "check the types of the values passed (query parameters, record fields)",
    "ArgumentError": "check the types of the values passed (query parameters, record fields)",
    "ArithmeticError": "check the values passed (query parameters, record fields)",
    "AccessMode": "store.query runs read-only Cypher; write through the store's methods",
    "": "fix the Cypher (docs/cypher.md has queries that run)",
}


#: statement error kinds that a value of the wrong type causes
_VALUE_ERRORS = frozenset({"TypeError", "ArgumentError", "ArithmeticError"})


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A driver error's reason on one line: "connection refused" when it was, else its
    message with line breaks collapsed, cut at ``limit`` characters."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _statement_error(what: str, exc: neo4j_errors.ClientError) -> InvalidArgumentError:
    kind = (exc.code or "").rpartition(".")[2]
    advice = _STATEMENT_ADVICE.get(kind, _STATEMENT_ADVICE[""])
    return InvalidArgumentError(f"could not {what}: {one_line(exc)} ({kind or exc.code}); {advice}")


def check_range(name: str, value: int, low: int, high: int) -> int:
    """``value`` when it is an int in [low, high]; InvalidArgumentError otherwise."""
    if not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def rows(records: Any) -> list[dict[str, Any]]:
    """A result's records as dicts."""
    return [r.data() for r in records]


def run_rows(
    tx: ManagedTransaction, query: str, params: Mapping[str, Any], what: str
) -> list[dict[str, Any]]:
    """Run ``query`` in ``tx``; its rows as dicts. A parameter value the driver cannot
    send (it raises TypeError or ValueError before anything reaches the server) is
    InvalidArgumentError."""
    try:
        result = tx.run(query, dict(params))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"could not {what}: a value passed has a type the database does not take "
            f"({exc}); pass numbers, strings, booleans, None, and lists and maps of those"
        ) from exc
    return rows(result)


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
            max_transaction_retry_time=0,  # this class retries (see the module doc)
        )

    @contextlib.contextmanager
    def translate_errors(self, what: str, *, caller_cypher: bool = False) -> Iterator[None]:
        """Translate driver errors into domain errors that say what to do.

        ``caller_cypher``: the statement is the caller's (``store.query``), so any
        statement error is theirs to fix. In the store's own statements only a value
        of the wrong type is (it came from the caller's records); other statement
        errors there are the store's bugs and stay as they are.
        """
        try:
            yield
        except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired) as exc:
            if embedded.stopped(self.config):
                raise embedded.not_running(self.config.data_dir, f" (needed to {what})") from exc
            raise UnavailableError(
                f"graph store {self.config.redacted()} is unreachable while trying to {what} "
                f"({one_line(exc)}); start it (the embedded server: `circuitscope db start`, "
                "or `ingest.store.embedded.start()` in Python) or fix NEO4J_URI",
                retried_for_s=self.config.retry_time_s,
            ) from exc
        except neo4j_errors.AuthError as exc:
            raise UnavailableError(
                f"graph store {self.config.redacted()} rejected the credentials; "
                "check NEO4J_USER and NEO4J_PASSWORD"
            ) from exc
        except neo4j_errors.ConstraintError as exc:
            raise FailedPreconditionError(
                f"could not {what}: a uniqueness constraint was violated ({one_line(exc)}); "
                "is another writer storing the same graph id?"
            ) from exc
        except neo4j_errors.CypherSyntaxError as exc:
            raise InvalidArgumentError(
                f"could not {what}: {one_line(exc)}; fix the Cypher"
            ) from exc
        except neo4j_errors.DatabaseError as exc:
            # A server-side failure, e.g. the server shutting down under a transaction.
            # Writes are idempotent (a rerun repairs a half-written graph): retry.
            raise UnavailableError(
                f"graph store {self.config.redacted()} failed while trying to {what} "
                f"({one_line(exc)}); it may be stopping or overloaded: retry"
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
            code = exc.code or ""
            if code.startswith("Neo.ClientError.Statement.") and (
                caller_cypher or code.rpartition(".")[2] in _VALUE_ERRORS
            ):
                # The caller's Cypher, its parameters, or a record's fields: a missing
                # parameter, a value of the wrong type, a bad name.
                raise _statement_error(what, exc) from exc
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
        caller_cypher: bool = False,
    ) -> T:
        fn = unit_of_work(timeout=self._timeout(timeout))(work)
        with self.translate_errors(what, caller_cypher=caller_cypher):
            return self._retrying(fn, write=write, what=what, deadline_s=timeout)

    def _retrying(
        self,
        fn: Callable[[ManagedTransaction], T],
        *,
        write: bool,
        what: str,
        deadline_s: float | None = None,
    ) -> T:
        """Run ``fn`` in a transaction of a fresh session, again after a retryable
        failure until ``retry_time_s`` has passed since the first (module doc), and
        not past ``deadline_s`` seconds from now (a caller's deadline) when given."""
        started = time.monotonic()
        first_failure: float | None = None
        pause = FIRST_PAUSE_S
        while True:
            try:
                with self._driver.session(database=self.config.database) as session:
                    return session.execute_write(fn) if write else session.execute_read(fn)
            except (neo4j_errors.DriverError, neo4j_errors.Neo4jError) as exc:
                if not exc.is_retryable():
                    raise
                gone = isinstance(
                    exc, neo4j_errors.ServiceUnavailable | neo4j_errors.SessionExpired
                )
                if gone and embedded.stopped(self.config):
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                left = self.config.retry_time_s - (now - first_failure)
                if deadline_s is not None:
                    left = min(left, deadline_s - (now - started))
                if left <= 0:
                    raise
                wait = min(left, pause * (1 + PAUSE_JITTER * (2 * random.random() - 1)))
                logger.info("could not %s (%s); retrying in %.1f s", what, one_line(exc), wait)
                time.sleep(wait)
                pause *= PAUSE_GROWTH

    def read_rows(
        self,
        query: str,
        params: Mapping[str, Any],
        timeout: float | None,
        what: str,
        *,
        caller_cypher: bool = False,
    ) -> list[dict[str, Any]]:
        return self.transaction(
            lambda tx: run_rows(tx, query, params, what),
            write=False,
            timeout=timeout,
            what=what,
            caller_cypher=caller_cypher,
        )

    def write_rows(
        self, query: str, params: Mapping[str, Any], timeout: float | None, what: str
    ) -> list[dict[str, Any]]:
        return self.transaction(
            lambda tx: run_rows(tx, query, params, what), write=True, timeout=timeout, what=what
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
