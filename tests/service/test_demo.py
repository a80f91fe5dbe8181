"""``circuitscope demo --tiny`` end to end: every stage, the printed client command
against the server it leaves running, and a second run that reuses everything."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ingest.store.embedded import stop
from service.cli import main
from tests.service.processes import stop_process

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_runs_every_stage_and_leaves_a_working_server(capsys):
    from ingest.paths import home
    from ingest.store import StoreConfig

    pids: list[int] = []
    try:
        assert main(["demo", "--tiny", "--port", "0"]) == 0
        out = capsys.readouterr().out
        for i, stage in enumerate(["zoo-model", "transcoders", "ingest", "queries", "serve"], 1):
            assert f"[{i}/5] {stage}" in out
        assert re.search(r"every MLP replaced: task greater_than prob_diff on \d+ examples", out)
        assert "graphs written:        4" in out
        assert "4 greater-than graphs stored for this set" in out
        assert ": SERVING" in out
        # both places say which graph store holds the graphs (and how to stop an embedded one)
        store_lines = [line for line in out.splitlines() if "graph store: " in line]
        assert len(store_lines) == 2
        if StoreConfig.from_env().embedded:
            assert all("`circuitscope db stop" in line for line in store_lines)
        pids.append(int(re.search(r"gRPC server pid (\d+)", out).group(1)))

        # The printed client command works against the running server.
        command = next(line for line in out.splitlines() if "circuitscope query" in line)
        argv = command.split()[1:]
        assert main(argv) == 0
        listing = json.loads(capsys.readouterr().out)
        prompts = [g["metadata"]["prompt"] for g in listing["items"]]
        assert len(prompts) == 4 and all(p.startswith("The war lasted") for p in prompts)
        # what the ingest recorded with each prompt comes back with it
        assert all(g["metadata"]["extra"]["counterfactual"] for g in listing["items"])

        # A second run reuses the model, the transcoders and the stored graphs.
        assert main(["demo", "--tiny", "--port", "0"]) == 0
        again = capsys.readouterr().out
        pids.append(int(re.search(r"gRPC server pid (\d+)", again).group(1)))
        assert "reused" in again and "already in the store:  4" in again
        assert "graphs written:        0" in again
    finally:
        for pid in pids:
            stop_process(pid)
        stop(Path(home()) / "db")
