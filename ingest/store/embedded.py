"""Start, reuse, inspect and stop the embedded ArcadeDB Bolt server.

With no ``NEO4J_URI``, circuitscope runs its own graph server (DESIGN.md section 3):
the program :mod:`ingest.store.embedded_server`, started detached in a separate
process (the JVM never shares a process with torch). Its data directory (default
``ingest.paths.home()/db``) holds:

- ``server.json`` (mode 0600): Bolt, HTTP and HTTPS ports, chosen free on loopback at
  each start, the generated root password and the database name;
- ``server.pid``: the server's pid while it runs; ``server.log``: its output;
- ``arcadedb/``: the databases themselves, kept across restarts.

:func:`start` reuses a server that is alive and answers Bolt; otherwise it starts one
and waits until Bolt answers (the JVM takes 5-10 s). A lock file serialises starters.
:func:`stop` sends SIGTERM and waits for a clean shutdown. :func:`embedded_server` is
a context manager for tests and tools: it yields a :class:`StoreConfig` for the server.
:func:`config_for` gives the config of a running server; :func:`stopped` tells the
store that the server a config points at is down, so that its calls fail at once
instead of retrying connections that a stopped server refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ingest.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from ingest.processes import live_command_line
from ingest.store.config import (
    EMBEDDED_DATABASE,
    StoreConfig,
    data_dir_flag,
    default_data_dir,
)

logger = logging.getLogger(__name__)

SERVER_MODULE = "ingest.store.embedded_server"
STATE_FILE = "server.json"
PID_FILE = "server.pid"
LOG_FILE = "server.log"
DEFAULT_HEAP = os.environ.get("CIRCUITSCOPE_DB_HEAP", "2g")
DEFAULT_COMMAND_TIMEOUT_S = 300.0
USER = "root"


@dataclass(frozen=True)
class ServerStatus:
    """What :func:`status` found in a data directory."""

    data_dir: Path
    running: bool
    pid: int | None
    uri: str | None
    answers: bool

    def describe(self) -> str:
        if not self.running:
            return f"embedded graph server: stopped (data in {self.data_dir})"
        health = "answers Bolt" if self.answers else "does NOT answer Bolt yet"
        return (
            f"embedded graph server: running, pid {self.pid}, {self.uri} ({health}), "
            f"data in {self.data_dir}"
        )


def _resolve(data_dir: Path | str | None) -> Path:
    return Path(data_dir).expanduser().resolve() if data_dir else default_data_dir().resolve()


def _free_port(preferred: int | None = None) -> int:
    """``preferred`` when it can be bound on loopback, else a fresh free port.

    A restarted server keeps its ports when they are still free, so clients that
    resolved its address before (a running ingest worker) reconnect to it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if preferred:
            # Like the server, tolerate the old server's connections in TIME_WAIT.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", int(preferred)))
                return int(preferred)
            except OSError:
                pass
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: the keys of ``server.json`` every reader needs
STATE_KEYS = ("bolt_port", "password", "database")
#: the subdirectory that holds the databases
DATABASES = "arcadedb"
#: what a data directory may hold before its first start (a server's own files, and a
#: mounted volume's lost+found)
_OWN_FILES = {STATE_FILE, "server.tmp", PID_FILE, LOG_FILE, DATABASES, ".lock", "log", "lost+found"}


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    """``server.json``, or None when no server was started here. A damaged file is an
    error naming it: it holds the only copy of the databases' root password."""
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError) as exc:
        raise FailedPreconditionError(
            f"{path} is damaged ({exc}); it holds the root password of the databases in "
            f"{data_dir / DATABASES}: restore it from a backup, or remove {data_dir} to start "
            "with an empty store"
        ) from exc
    return dict(state)


def _data_dir(data_dir: Path | str | None, *, create: bool) -> Path | None:
    """The resolved data directory; None when it does not exist and ``create`` is
    False. A file is refused; so is, at a first start (no ``server.json`` yet), a
    directory holding anything but the server's own files: they never go in with someone
    else's. A directory the server takes is made 0700 (``server.json`` holds a password);
    a used one keeps the mode it has."""
    root = _resolve(data_dir)
    where = "choose another data directory (--data-dir; default $CIRCUITSCOPE_HOME/db)"
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"the data directory {root} is a file: {where}")
    if not root.exists():
        if not create:
            return None
        try:
            root.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot create the data directory {root} ({exc.strerror or exc}): {where}"
            ) from exc
        return root
    if create and not (root / STATE_FILE).exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise InvalidArgumentError(
                f"{root} holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}), not an embedded server's: {where}"
            )
        os.chmod(root, 0o700)
    return root


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _alive(pid: int, root: Path) -> bool:
    """True when ``pid`` is a live (not zombie) embedded server process of the data
    directory ``root`` (a stale pid file's pid may since be another directory's server,
    which must not be reused or stopped)."""
    args = live_command_line(pid)
    if args is None:
        return False
    serves_root = any(
        flag == b"--data-dir" and value == os.fsencode(root)
        for flag, value in itertools.pairwise(args)
    )
    return SERVER_MODULE.encode() in args and serves_root


def _pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, data_dir) else None


def _config(root: Path, **overrides: Any) -> StoreConfig:
    """The StoreConfig of the server of ``root`` as ``server.json`` records it, running
    or not; FailedPreconditionError when none was ever started there."""
    state = _read_state(root)
    if state is None:
        raise FailedPreconditionError(
            f"no embedded graph server was ever started in {root}; run `circuitscope db start`"
            f"{data_dir_flag(root)}, or `ingest.store.embedded.start({_data_dir_arg(root)})` "
            "in Python"
        )
    return StoreConfig(
        uri=f"bolt://127.0.0.1:{state['bolt_port']}",
        user=USER,
        password=state["password"],
        database=state["database"],
        data_dir=root,
        **overrides,
    )


def config_for(data_dir: Path | str | None = None, **overrides: Any) -> StoreConfig:
    """The StoreConfig of the embedded server running in ``data_dir`` (e.g. started by
    ``circuitscope db start``). UnavailableError when it is not running (it would refuse
    every connection), FailedPreconditionError when none was ever started there:
    :func:`start` starts it and returns the same config."""
    root = _resolve(data_dir)
    config = _config(root, **overrides)
    if _pid(root) is None:
        raise not_running(root)
    return config


def _data_dir_arg(root: Path) -> str:
    return "" if root == default_data_dir().resolve() else repr(str(root))


def not_running(data_dir: Path | str | None, context: str = "") -> UnavailableError:
    """The error for a stopped embedded server, ``context`` following its first words."""
    root = _resolve(data_dir)
    return UnavailableError(
        f"the embedded graph server of {root} is not running{context}; start it with "
        f"`circuitscope db start{data_dir_flag(root)}` or, in Python, "
        f"`ingest.store.embedded.start({_data_dir_arg(root)})`, then retry"
    )


def stopped(config: StoreConfig) -> bool:
    """Whether ``config`` is that of an embedded server (its ``data_dir`` records its
    ``uri``) whose process is not running: connections are refused until a start, so
    retrying them is pointless. Cheap: two small file reads, no connection."""
    if config.data_dir is None or config.uri is None:
        return False
    root = _resolve(config.data_dir)
    try:
        recorded = _config(root).uri
    except FailedPreconditionError:
        return False
    return recorded == config.uri and _pid(root) is None


def _answers(config: StoreConfig, timeout: float) -> bool:
    """Whether the server answers a query within about ``timeout`` seconds.

    The driver bounds connecting, not reading: a server that accepts the connection
    but never answers (a JVM still starting, or stalled) would block the probe for
    ever. The probe runs in a daemon thread and counts as no answer when it overruns.
    """
    answered: list[bool] = []
    probe = threading.Thread(
        target=lambda: answered.append(_probe(config, timeout)),
        name="embedded-server-probe",
        daemon=True,
    )
    probe.start()
    probe.join(2 * timeout)
    return bool(answered and answered[0])


def _probe(config: StoreConfig, timeout: float) -> bool:
    from neo4j import GraphDatabase
    from neo4j.exceptions import DriverError, Neo4jError

    try:
        with GraphDatabase.driver(
            config.uri or "",
            auth=(config.user, config.password or ""),
            connection_timeout=timeout,
            connection_acquisition_timeout=timeout,
        ) as driver:
            driver.verify_connectivity()
            records, _, _ = driver.execute_query("RETURN 1 AS ok", database_=config.database)
            return bool(records and records[0]["ok"] == 1)
    except (DriverError, Neo4jError, OSError):
        return False


def status(data_dir: Path | str | None = None) -> ServerStatus:
    root = _data_dir(data_dir, create=False) or _resolve(data_dir)
    pid = _pid(root)
    if pid is None or _read_state(root) is None:
        return ServerStatus(root, False, None, None, False)
    config = _config(root)
    return ServerStatus(root, True, pid, config.uri, _answers(config, 5.0))


@contextlib.contextmanager
def _lock(data_dir: Path) -> Iterator[None]:
    with open(data_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log_tail(data_dir: Path, lines: int = 15) -> str:
    try:
        return "\n".join((data_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


HEAP_PATTERN = re.compile(r"[1-9][0-9]*[kKmMgGtT]?")


def check_settings(heap: str, command_timeout_s: float) -> None:
    """InvalidArgumentError for a heap the JVM would refuse (``-Xmx`` takes a number
    with an optional k, m or g) or a query bound that is not a finite number >= 0."""
    if not HEAP_PATTERN.fullmatch(heap):
        raise InvalidArgumentError(
            f"heap size {heap!r} is not one the JVM takes: a whole number with an optional "
            "k, m, g or t suffix, e.g. 2g or 512m (--heap, or CIRCUITSCOPE_DB_HEAP)"
        )
    if not math.isfinite(command_timeout_s) or command_timeout_s < 0:
        raise InvalidArgumentError(
            f"the query time limit must be a finite number of seconds >= 0 (0: none), got "
            f"{command_timeout_s} (--command-timeout-s)"
        )


def start(
    data_dir: Path | str | None = None,
    *,
    heap: str = DEFAULT_HEAP,
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
    timeout_s: float = 180.0,
    **overrides: Any,
) -> StoreConfig:
    """Start the embedded server in ``data_dir``, or reuse the one running there.

    ``command_timeout_s`` bounds every query on a server this call starts (ArcadeDB
    ignores per-transaction timeouts); a reused server keeps the bound it started with.

    Returns the StoreConfig to reach it (``overrides`` go into it, e.g. batch_size).
    Raises UnavailableError, with the end of the server log, when it does not answer
    within ``timeout_s``.
    """
    check_settings(heap, command_timeout_s)
    root = _data_dir(data_dir, create=True)
    assert root is not None
    with _lock(root):
        pid = _pid(root)
        if pid is not None:
            config = _config(root, **overrides)
            if _answers(config, 10.0):
                logger.info("reusing embedded graph server pid %d at %s", pid, config.uri)
                return config
            logger.warning("embedded server pid %d does not answer; restarting it", pid)
            _terminate(root, pid, 60.0)
        state = _read_state(root)
        if state is None:
            if (root / DATABASES).is_dir() and any((root / DATABASES).iterdir()):
                raise FailedPreconditionError(
                    f"{root} holds databases but no {STATE_FILE}, the file with their root "
                    f"password: restore it, or remove {root / DATABASES} to start with an "
                    "empty store"
                )
            state = {"password": secrets.token_urlsafe(24), "database": EMBEDDED_DATABASE}
        for key in ("bolt_port", "http_port", "https_port"):
            state[key] = _free_port(state.get(key))
        _write_state(root, state)
        env = dict(os.environ)
        # The program must import this package whatever the child's working directory.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(root / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    SERVER_MODULE,
                    "--data-dir",
                    str(root),
                    "--heap",
                    heap,
                    "--command-timeout-s",
                    str(command_timeout_s),
                ],
                cwd=root,  # ArcadeDB writes ./log relative to its working directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # detached: survives its starter, no terminal signals
            )
        try:
            (root / PID_FILE).write_text(str(proc.pid))
            config = _config(root, **overrides)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise UnavailableError(
                        f"the embedded graph server exited with status {proc.returncode} "
                        f"while starting; its log ({root / LOG_FILE}) ends with:\n"
                        f"{_log_tail(root)}"
                    )
                if _answers(config, 5.0):
                    logger.info("embedded graph server pid %d ready at %s", proc.pid, config.uri)
                    return config
                time.sleep(0.5)
        except KeyboardInterrupt:
            # A start cut short leaves no server behind (it runs detached otherwise).
            _terminate(root, proc.pid, 30.0)
            raise
        _terminate(root, proc.pid, 30.0)
        raise UnavailableError(
            f"the embedded graph server did not answer within {timeout_s:.0f} s; "
            f"see {root / LOG_FILE}, or set NEO4J_URI to use another server. Log ends with:\n"
            f"{_log_tail(root)}"
        )


def _terminate(root: Path, pid: int, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid, root):
        time.sleep(0.2)
    if _alive(pid, root):
        logger.warning(
            "embedded server pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout_s
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid, root):
            time.sleep(0.1)
    (root / PID_FILE).unlink(missing_ok=True)


def stop(data_dir: Path | str | None = None, *, timeout_s: float = 60.0) -> bool:
    """Stop the embedded server in ``data_dir``; False when none was running."""
    root = _data_dir(data_dir, create=False)
    if root is None:
        return False
    with _lock(root):
        pid = _pid(root)
        if pid is None:
            (root / PID_FILE).unlink(missing_ok=True)
            return False
        _terminate(root, pid, timeout_s)
        return True


@contextlib.contextmanager
def embedded_server(
    data_dir: Path | str | None = None,
    *,
    heap: str = DEFAULT_HEAP,
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
    stop_on_exit: bool = True,
    **overrides: Any,
) -> Iterator[StoreConfig]:
    """Run (or reuse) the embedded server for the duration of a ``with`` block.

    Yields the StoreConfig to pass to :func:`ingest.store.open_store`; stops the server
    on exit when ``stop_on_exit``.
    """
    config = start(data_dir, heap=heap, command_timeout_s=command_timeout_s, **overrides)
    try:
        yield config
    finally:
        if stop_on_exit:
            stop(config.data_dir)


def with_server(config: StoreConfig, *, heap: str = DEFAULT_HEAP) -> StoreConfig:
    """``config`` pointed at a running embedded server (started if needed), keeping its
    batch size and timeouts."""
    server = start(config.data_dir, heap=heap)
    return replace(
        config,
        uri=server.uri,
        user=server.user,
        password=server.password,
        database=server.database,
        data_dir=server.data_dir,
    )
