"""``circuitscope db start|stop|status``: manage the embedded graph server.

Cheap to import: the server machinery is imported by the handlers.
"""

from __future__ import annotations

import argparse

from ingest.arguments import path


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
            type=path,
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

    heap = embedded.DEFAULT_HEAP if args.heap is None else args.heap
    limit = args.command_timeout_s
    before = embedded.status(args.data_dir)
    config = embedded.start(
        args.data_dir,
        heap=heap,
        command_timeout_s=embedded.DEFAULT_COMMAND_TIMEOUT_S if limit is None else limit,
    )
    print(embedded.status(config.data_dir).describe())
    print(f"NEO4J_URI={config.uri} NEO4J_USER={config.user} NEO4J_DATABASE={config.database}")
    print(f"(password in {config.data_dir}/{embedded.STATE_FILE})")
    if before.running and before.answers and (args.heap is not None or limit is not None):
        print(
            "the server was already running: --heap and --command-timeout-s apply at its "
            "next start (`circuitscope db stop`, then `circuitscope db start`)"
        )
    _say_if_unused()
    return 0


def _say_if_unused() -> None:
    """With NEO4J_URI set, commands use that server and never this one: say so."""
    import os

    from ingest.store.config import StoreConfig

    if os.environ.get("NEO4J_URI"):
        print(
            f"note: NEO4J_URI is set, so circuitscope commands use "
            f"{StoreConfig.from_env().redacted()}, not this embedded server"
        )


def _stop(args: argparse.Namespace) -> int:
    from ingest.store import embedded

    stopped = embedded.stop(args.data_dir)
    print("embedded graph server stopped" if stopped else "embedded graph server was not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ingest.store import embedded

    st = embedded.status(args.data_dir)
    print(st.describe())
    _say_if_unused()
    return 0 if st.running and st.answers else 3
