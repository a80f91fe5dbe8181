"""The embedded graph server program: ArcadeDB with its Bolt plugin, in its own process.

Run by :mod:`ingest.store.embedded` as ``python -m ingest.store.embedded_server
--data-dir DIR``, detached from its parent. It reads the ports and the root password
from ``DIR/server.json`` (written by the starter, mode 0600; never on the command
line, where other users could read it), starts an ArcadeDB server
(``arcadedb_embedded``: a JVM through JPype, which is why it never shares a process
with torch) listening on loopback only, creates the database if missing, writes its
pid to ``DIR/server.pid`` and serves until SIGTERM or SIGINT, then stops the server
cleanly (flushing the database), removes the pid file the starter wrote and exits at
once: ArcadeDB's per-connection Bolt threads are not daemons, so with a client still
connected the JVM would otherwise keep the stopped server's process alive.

Readiness is not signalled here: the starter connects over Bolt until it answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from ingest.processes import exit_now

logger = logging.getLogger("ingest.store.embedded_server")

BOLT_PLUGIN = "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"


def serve(data_dir: Path, heap: str, command_timeout_s: float) -> int:
    state = json.loads((data_dir / "server.json").read_text())
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    import arcadedb_embedded

    server = arcadedb_embedded.ArcadeDBServer(
        str((data_dir / "arcadedb").resolve()),
        root_password=state["password"],
        config={
            "host": "127.0.0.1",
            "http_port": state["http_port"],
            "server_httpsIncomingPort": state["https_port"],
            "server_plugins": BOLT_PLUGIN,
            "bolt_port": state["bolt_port"],
        },
        # -Xrs: the JVM leaves SIGTERM/SIGINT to Python, so they stop the server cleanly.
        # Without SIGQUIT the JVM would open its attach socket at start, and leave
        # /tmp/.java_pid<pid> behind: no attaching, so no file.
        # ArcadeDB ignores the Bolt transaction timeout: arcadedb.command.timeout bounds
        # every query server-wide instead (read from the JVM's system properties).
        jvm_kwargs={
            "heap_size": heap,
            "jvm_args": "-Xrs -XX:+DisableAttachMechanism "
            f"-Darcadedb.command.timeout={int(command_timeout_s * 1000)}",
        },
    )
    pid_file = data_dir / "server.pid"
    server.start()
    try:
        server.create_database(state["database"])
        logger.info("serving Bolt on 127.0.0.1:%d", state["bolt_port"])
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        pid_file.unlink(missing_ok=True)
        logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--heap", default="1g", help="JVM heap size, e.g. 1g, 4g")
    parser.add_argument(
        "--command-timeout-s",
        type=float,
        default=300.0,
        help="the longest any one query may run (server-wide; 0 for no limit)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return serve(args.data_dir, args.heap, args.command_timeout_s)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for a usage error
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        logger.exception("the embedded graph server failed")
        code = 1
    exit_now(code)  # the JVM's non-daemon threads would keep it alive
