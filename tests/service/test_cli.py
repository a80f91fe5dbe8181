"""``circuitscope serve`` as a real process and ``circuitscope query`` against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.store.base import GraphStore
from service.cli import main
from service.client import CircuitsClient
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _query(target: str, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["query", "--target", target, *argv])
    return code, capsys.readouterr().out


def test_query_commands_print_json(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIRCUITSCOPE_TOKEN", TOKEN)
    code, out = _query(target, "graphs", "list", "--task", "other", capsys=capsys)
    assert code == 0
    assert [g["metadata"]["graph_id"] for g in json.loads(out)["items"]] == ["g-gamma"]
    code, out = _query(
        target, "graphs", "subgraph", "g-alpha", "0_0_1", "--top-k", "2", capsys=capsys
    )
    assert code == 0 and len(json.loads(out)["edges"]) >= 2
    code, out = _query(target, "graphs", "paths", "g-alpha", "E_100_0", "3_500_1", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["node_ids"][0] == "E_100_0"
    code, out = _query(target, "features", "get", "test-set", "0", "0", capsys=capsys)
    assert code == 0 and json.loads(out)["label"] == "layer 0 feature 0"
    code, out = _query(target, "health", capsys=capsys)
    assert (code, out.strip()) == (0, "SERVING")


def test_query_errors_are_one_line_with_exit_2(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIRCUITSCOPE_TOKEN", TOKEN)
    assert main(["query", "--target", target, "graphs", "get", "no-such-graph"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitscope: error:") and "no-such-graph" in err
    assert main(["query", "--target", target, "--timeout", "-1", "health"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("CIRCUITSCOPE_TOKEN", "w" * 32)
    assert main(["query", "--target", target, "graphs", "list"]) == 2
    err = capsys.readouterr().err
    assert "token" in err.lower() and "--token-file" in err and "CIRCUITSCOPE_TOKEN" in err
    monkeypatch.delenv("CIRCUITSCOPE_TOKEN")
    assert main(["query", "--target", target, "graphs", "list"]) == 2
    err = capsys.readouterr().err
    assert "missing bearer token" in err and "--token-file" in err


def test_serve_runs_until_sigterm_then_exits_cleanly(store: GraphStore, tmp_path: Path) -> None:
    config = store.config  # type: ignore[attr-defined]
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ,
        NEO4J_URI=config.uri,
        NEO4J_USER=config.user,
        NEO4J_PASSWORD=config.password,
        NEO4J_DATABASE=config.database,
        PYTHONPATH=str(REPO),
    )
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    argv += ["--tokens-file", str(tokens), "--health-interval", "1"]
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, env=env, stderr=stderr, text=True)
    try:
        with CircuitsClient(f"127.0.0.1:{port}", token=TOKEN, timeout_s=5) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.health() == "SERVING":
                        break
                except Exception as exc:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise AssertionError(f"serve did not come up: {log.read_text()}") from exc
                time.sleep(0.3)
            assert client.get_graph("g-alpha").metadata.prompt == "alpha beta"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert f"serving circuits.v1 on 127.0.0.1:{port}" in text  # said without -v
    assert f"graph store: {config.uri} (database {config.database!r}" in text
