"""The embedded server's life cycle and the ``circuitscope db`` commands, for real."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ingest.errors import ResourceExhaustedError, UnavailableError
from ingest.store import StoreConfig, embedded, open_store
from ingest.store.bolt import BoltGraphStore
from service.cli import main
from tests.ingest.store.helpers import make_graph

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_raises_unavailable() -> None:
    config = StoreConfig(uri=f"bolt://127.0.0.1:{_free_port()}", password="x", connect_timeout_s=2)
    with pytest.raises(UnavailableError, match="unreachable") as info:
        open_store(config)
    _one_line_naming_the_cli_and_python(str(info.value))


def _one_line_naming_the_cli_and_python(message: str) -> None:
    assert "\n" not in message, message
    assert "`circuitscope db start" in message and "ingest.store.embedded.start(" in message


def test_a_refused_server_is_retried_quietly_for_retry_time_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server given by URI may be restarting: connections refused are retried, for
    # retry_time_s and no longer, logging one line per retry below WARNING.
    config = StoreConfig(uri=f"bolt://127.0.0.1:{_free_port()}", password="x", retry_time_s=1.5)
    store = BoltGraphStore(config)
    caplog.set_level(logging.DEBUG)
    try:
        asked = time.monotonic()
        with pytest.raises(UnavailableError, match="connection refused") as info:
            store.list_graphs()
        took = time.monotonic() - asked
    finally:
        store.close()
    assert 1.4 < took < 3.0, took
    assert info.value.retried_for_s == 1.5
    _one_line_naming_the_cli_and_python(str(info.value))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries and all("\n" not in m for m in retries)
    # a caller's deadline (a gRPC call's time left) ends the retries sooner
    store = BoltGraphStore(replace(config, retry_time_s=30.0))
    try:
        asked = time.monotonic()
        with pytest.raises(UnavailableError, match="connection refused"):
            store.list_graphs(timeout=0.5)
        took = time.monotonic() - asked
    finally:
        store.close()
    assert took < 2.0, took


def test_calls_on_a_stopped_embedded_server_fail_at_once_saying_how_to_start_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "db"
    with embedded.embedded_server(data_dir, heap="512m") as config, open_store(config) as store:
        store.write_graph(make_graph("kept", seed=1, n_layers=1, n_pos=2))
        embedded.stop(data_dir)
        caplog.set_level(logging.INFO)
        for call in (store.list_graphs, lambda: store.get_graph("kept")):
            asked = time.monotonic()
            with pytest.raises(UnavailableError, match="is not running") as info:
                call()
            assert time.monotonic() - asked < 1.0  # the driver's retries took ~7 s
            message = str(info.value)
            _one_line_naming_the_cli_and_python(message)
            assert f"--data-dir {data_dir.resolve()}" in message
            assert info.value.retried_for_s is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        # As its docstring says, config_for needs a running server; so does open_store.
        with pytest.raises(UnavailableError, match="is not running") as info:
            embedded.config_for(data_dir)
        _one_line_naming_the_cli_and_python(str(info.value))
        with pytest.raises(UnavailableError, match="is not running"):
            open_store(config)
        # Started again, the server serves the store still open, and config_for works.
        again = embedded.start(data_dir, heap="512m")
        assert embedded.config_for(data_dir) == again
        with open_store(again) as reopened:
            assert reopened.get_graph_summary("kept").n_nodes > 0
        if again.uri == config.uri:  # the restart kept its port (the usual case)
            assert [s.graph_id for s in store.list_graphs().items] == ["kept"]
    assert not embedded.status(data_dir).running


def test_a_printed_config_hides_the_password(arcadedb_config: StoreConfig) -> None:
    assert arcadedb_config.password
    assert arcadedb_config.data_dir is not None
    reused = embedded.start(arcadedb_config.data_dir, heap="1g")
    for config in (arcadedb_config, reused, embedded.config_for(arcadedb_config.data_dir)):
        assert arcadedb_config.password not in repr(config), repr(config)


def test_wrong_password_raises_unavailable(arcadedb_config: StoreConfig) -> None:
    from dataclasses import replace

    with pytest.raises(UnavailableError, match="credentials"):
        open_store(replace(arcadedb_config, password="wrong"))


def test_state_file_is_private_and_server_is_reused(arcadedb_config: StoreConfig) -> None:
    data_dir = arcadedb_config.data_dir
    assert data_dir is not None
    state = data_dir / embedded.STATE_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    before = embedded.status(data_dir)
    assert before.running and before.answers and before.uri == arcadedb_config.uri
    again = embedded.start(data_dir, heap="1g")  # reuse, not a second JVM
    assert again.uri == arcadedb_config.uri
    assert embedded.status(data_dir).pid == before.pid


def test_db_cli_start_status_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "db"
    try:
        start = ["db", "start", "--data-dir", str(data_dir), "--heap", "512m"]
        assert main([*start, "--command-timeout-s", "1"]) == 0
        out = capsys.readouterr().out
        assert "running" in out and "NEO4J_URI=bolt://127.0.0.1:" in out
        assert main(["db", "status", "--data-dir", str(data_dir)]) == 0
        pid = embedded.status(data_dir).pid
        capsys.readouterr()
        # a second start reuses the server and says its new settings wait for a restart
        assert main(["db", "start", "--data-dir", str(data_dir), "--heap", "1g"]) == 0
        assert "--heap and --command-timeout-s apply at its next start" in capsys.readouterr().out
        assert embedded.status(data_dir).pid == pid
        assert pid is not None and os.path.exists(f"/proc/{pid}")
        # no attach socket: a stopped JVM used to leave /tmp/.java_pid<pid> behind
        assert not os.path.exists(f"/tmp/.java_pid{pid}")
        graph = make_graph("persisted", seed=1, n_layers=1, n_pos=2)
        with open_store(embedded.config_for(data_dir)) as store:
            store.write_graph(graph)
            # The server-wide command timeout stops a runaway query (ArcadeDB ignores
            # the per-transaction one).
            with pytest.raises(ResourceExhaustedError, match="time limit"):
                store.query(
                    "UNWIND range(1, 4000) AS a UNWIND range(1, 4000) AS b "
                    "WITH a, b WHERE a + b = -1 RETURN count(*) AS c"
                )
            # A client still holding Bolt connections does not keep the server alive:
            # SIGTERM stops it (no SIGKILL after the wait).
            assert main(["db", "stop", "--data-dir", str(data_dir)]) == 0
            assert "stopped" in capsys.readouterr().out
            assert "ignored SIGTERM" not in caplog.text
        assert main(["db", "status", "--data-dir", str(data_dir)]) == 3
        assert "stopped" in capsys.readouterr().out
        assert not (data_dir / embedded.PID_FILE).exists()
        # SIGTERM reached the server program, which stopped ArcadeDB itself.
        assert "INFO stopped" in (data_dir / embedded.LOG_FILE).read_text()
        assert not embedded.stop(data_dir)
        # The data directory persists: a restarted server serves the same graph. A used
        # directory is the server's: a file put beside its own does not block the start.
        (data_dir / "server.json.bak").write_text("{}")
        with embedded.embedded_server(data_dir, heap="512m") as config, open_store(config) as store:
            assert store.get_graph("persisted").nodes == graph.nodes
        assert not embedded.status(data_dir).running
    finally:
        embedded.stop(data_dir)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--heap", "bogus", "heap size 'bogus' is not one the JVM takes"),
        ("--heap", "2gb", "e.g. 2g or 512m"),
        ("--command-timeout-s", "-5", "got -5.0 (--command-timeout-s)"),
        ("--command-timeout-s", "nan", "finite number of seconds"),
        ("--heap", "", "heap size '' is not one the JVM takes"),
    ],
)
def test_db_start_refuses_bad_settings_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    assert main(["db", "start", "--data-dir", str(tmp_path / "db"), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "db").exists()


def test_db_commands_refuse_data_dirs_that_are_not_theirs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def one_line(*needles: str) -> None:
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert all(needle in err for needle in needles), err

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for action in ("start", "stop", "status"):
        assert main(["db", action, "--data-dir", str(a_file)]) == 2
        one_line(f"the data directory {a_file} is a file")
    # somebody else's directory: refused, its mode and contents untouched
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "notes.txt").write_text("keep")
    assert main(["db", "start", "--data-dir", str(shared)]) == 2
    one_line("holds other files (notes.txt)", "choose another data directory")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert [p.name for p in shared.iterdir()] == ["notes.txt"]
    assert main(["db", "start", "--data-dir", str(a_file / "db")]) == 2
    one_line("cannot create the data directory", "choose another data directory")
    with pytest.raises(SystemExit) as exit_info:
        main(["db", "start", "--data-dir", ""])
    assert exit_info.value.code == 2
    assert "--data-dir: an empty path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{broken", "server.json is damaged"),
        ("null", "a JSON NoneType, not an object"),
        ('{"database": "circuitscope"}', "no bolt_port, password"),
    ],
)
def test_a_damaged_state_file_is_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    data_dir = tmp_path / "db"
    data_dir.mkdir()
    (data_dir / embedded.STATE_FILE).write_text(content)
    assert main(["db", "start", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "restore it from a backup" in err and "Traceback" not in err, err
    assert (data_dir / embedded.STATE_FILE).read_text() == content  # never rewritten


def test_databases_without_their_password_file_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A new password would not open the old databases: the start would wait out its
    # whole timeout and blame an unanswering server.
    data_dir = tmp_path / "db"
    (data_dir / embedded.DATABASES / "circuitscope").mkdir(parents=True)
    assert main(["db", "start", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds databases but no server.json" in err and "Traceback" not in err, err
    assert not (data_dir / embedded.STATE_FILE).exists()


def test_a_start_cut_short_by_ctrl_c_leaves_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "db"
    started: list[int] = []

    def interrupted(config: StoreConfig, timeout: float) -> bool:
        started.append(int((data_dir / embedded.PID_FILE).read_text()))
        raise KeyboardInterrupt  # as Ctrl-C during the wait for Bolt

    monkeypatch.setattr(embedded, "_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.start(data_dir, heap="256m")
    assert started and not embedded._alive(started[0], data_dir.resolve())
    assert not embedded.status(data_dir).running


def test_a_pid_file_naming_another_directorys_server_is_stale(tmp_path: Path) -> None:
    """A stale pid file's pid may since belong to the server of another data directory:
    that server is neither reused nor stopped from here."""
    one, other = tmp_path / "one", tmp_path / "other"
    one.mkdir()
    other.mkdir()
    # A live process whose command line reads as the server of `one`.
    command = ["-m", embedded.SERVER_MODULE, "--data-dir", str(one)]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *command])
    try:
        for root in (one, other):
            (root / embedded.PID_FILE).write_text(str(proc.pid))
        assert embedded._pid(one) == proc.pid
        assert embedded._pid(other) is None
    finally:
        proc.kill()
        proc.wait()
