"""``circuitscope db start|stop|status``: manage the embedded graph server.

Cheap to import: the server machinery is imported by the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "db",
        help="manage the embedded graph server (used when NEO4J_URI is not set)",
        description="Start, stop or inspect the embedded ArcadeDB Bolt server.",
    )
    actions = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("start", _start, "start the server, or reuse the one running"),
        ("stop", _stop, "stop the server"),
        ("status", _status, "say whether the server runs and answers"),
    ):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="the server's data directory (default: $CIRCUITSCOPE_HOME/db)",
        )
        if name == "start":
            sub.add_argument("--heap", default=None, help="JVM heap size, e.g. 2g")
            sub.add_argument(
                "--command-timeout-s",
                type=float,
                default=None,
                help="the longest any one query may run (default 300; 0 for no limit)",
            )
        sub.set_defaults(handler=handler)


def _start(args: argparse.Namespace) -> int:
    from ingest.store import embedded

    heap = args.heap or embedded.DEFAULT_HEAP
    limit = args.command_timeout_s
    config = embedded.start(
        args.data_dir,
        heap=heap,
        command_timeout_s=embedded.DEFAULT_COMMAND_TIMEOUT_S if limit is None else limit,
    )
    print(embedded.status(config.data_dir).describe())
    print(f"NEO4J_URI={config.uri} NEO4J_USER={config.user} NEO4J_DATABASE={config.database}")
    print(f"(password in {config.data_dir}/{embedded.STATE_FILE})")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from ingest.store import embedded

    stopped = embedded.stop(args.data_dir)
    print("embedded graph server stopped" if stopped else "embedded graph server was not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ingest.store import embedded

    st = embedded.status(args.data_dir)
    print(st.describe())
    return 0 if st.running and st.answers else 3
