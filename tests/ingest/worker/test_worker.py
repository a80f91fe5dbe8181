"""The ingest worker end to end: a tiny zoo model, real transcoders, the real embedded
graph server, the console script; idempotent reruns, SIGKILL mid-write, a store outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.attribution.artifact import load_artifact
from ingest.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from ingest.store import StoreConfig, open_store
from ingest.store.base import GraphStore
from ingest.store.embedded import start, stop
from ingest.transcoders.formats import load_any
from ingest.worker.compute import AttributionComputer
from ingest.worker.keys import GraphSettings, graph_key
from ingest.worker.prompts import PromptSpec, read_prompts
from service.cli import main
from tests.ingest.worker.conftest import store_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


def _specs(prompt_file: Path) -> list[PromptSpec]:
    return [s for s in read_prompts(prompt_file) if isinstance(s, PromptSpec)]


def _expected(worker_model: tuple[Path, Path], prompt_file: Path) -> dict[str, object]:
    """What a clean, uninterrupted computation gives: graph id -> pruned graph."""
    model, transcoders = worker_model
    computer = AttributionComputer.from_paths(str(model), transcoders, GraphSettings())
    out = {}
    for spec in _specs(prompt_file):
        gid = graph_key(computer.model_fingerprint, computer.set_id, spec, GraphSettings())
        out[gid] = computer.compute(spec, gid).to_graph(pruned=True)
    return out


def _edges(graph) -> set[tuple[str, str, float]]:
    return {(s, t, round(float(w), 5)) for s, t, w in graph.edge_list()}


def _assert_store_matches(store: GraphStore, expected: dict[str, object]) -> None:
    for gid, graph in expected.items():
        stored = store.get_graph(gid)
        assert [n.node_id for n in stored.nodes] == [n.node_id for n in graph.nodes]
        assert _edges(stored) == _edges(graph)
        assert stored.metadata.task == "greater_than"
        assert stored.metadata.replacement_score == pytest.approx(
            graph.metadata.replacement_score, rel=1e-6
        )


def _ingest_args(worker_model, prompt_file: Path, artifacts: Path, *extra: str) -> list[str]:
    model, transcoders = worker_model
    return ["ingest", "--prompts", str(prompt_file), "--model", str(model),
            "--transcoders", str(transcoders), "--artifacts", str(artifacts),
            "--no-progress", *extra]  # fmt: skip


def _complete_ids(store: GraphStore) -> set[str]:
    rows = store.query("MATCH (g:Graph) WHERE g.status = 'complete' RETURN g.graph_id AS id")
    return {r["id"] for r in rows}


def _wipe(store: GraphStore) -> None:
    for row in store.query("MATCH (g:Graph) RETURN g.graph_id AS id"):
        store.delete_graph(row["id"])


def test_ingest_is_idempotent_and_matches_a_clean_computation(
    worker_model, prompt_file, worker_store_config, tmp_path, monkeypatch, capsys
):
    for key, value in store_env(worker_store_config).items():
        monkeypatch.setenv(key, value)
    artifacts = tmp_path / "artifacts"
    assert main(_ingest_args(worker_model, prompt_file, artifacts)) == 0
    out = capsys.readouterr()
    assert f"graph store: {worker_store_config.redacted()}" in out.err
    assert "graphs written:        6" in out.out
    assert "bad lines skipped:     1" in out.out and "line 3: not valid JSON" in out.out

    expected = _expected(worker_model, prompt_file)
    with open_store(worker_store_config) as store:
        assert _complete_ids(store) >= set(expected)
        _assert_store_matches(store, expected)
        # The artifact holds the full graph; pruning it again gives the stored graph.
        for gid, graph in expected.items():
            summary = store.get_graph_summary(gid)
            assert summary.metadata.artifact_uri is not None
            artifact = load_artifact(Path(summary.metadata.artifact_uri.removeprefix("file://")))
            assert _edges(artifact.to_graph(pruned=True)) == _edges(graph)
            assert artifact.to_graph(pruned=False).n_edges >= graph.n_edges
        # The set is registered with its width, which feature labels are checked against.
        widths = store.query("MATCH (t:TranscoderSet) RETURN t.d_transcoder AS w")
        assert {"w": load_any(worker_model[1]).d_transcoder} in widths
        # Feature nodes name their catalog entry's set.
        one = store.get_graph(next(iter(expected)))
        assert one.metadata.set_id.startswith(one.metadata.set_id.split("@")[0])

    # A rerun finds everything done and computes nothing.
    assert main(_ingest_args(worker_model, prompt_file, artifacts)) == 0
    rerun = capsys.readouterr().out
    assert "graphs written:        0" in rerun and "already in the store:  6" in rerun

    # --strict refuses the file before doing anything.
    assert main(_ingest_args(worker_model, prompt_file, tmp_path / "a2", "--strict")) == 2
    assert "line 3" in capsys.readouterr().err
    assert not (tmp_path / "a2" / "graphs").exists()


def test_strict_checks_every_prompt_against_the_model_before_any_work(
    worker_model, worker_store_config, tmp_path, monkeypatch, capsys
):
    from ingest.zoo.tasks import get_task

    for key, value in store_env(worker_store_config).items():
        monkeypatch.setenv(key, value)
    good = [ex.prompt for ex in get_task("greater_than").examples("heldout")[6:8]]
    records = [
        {"prompt": good[0], "task": "strict-check"},
        {"prompt": "\U0001f389 \U0001f389", "task": "strict-check"},  # no token for it
        {"prompt": good[1], "counterfactual": "\U0001f389", "task": "strict-check"},
        {"prompt": good[1], "correct": "id:99999999", "incorrect": "id:1", "task": "strict-check"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    artifacts = tmp_path / "artifacts"
    query = "MATCH (g:Graph {task: 'strict-check'}) RETURN count(g) AS c"

    assert main(_ingest_args(worker_model, prompts, artifacts, "--strict")) == 2
    err = capsys.readouterr().err
    assert "3 bad line(s): line 2: " in err and "line 3: counterfactual: " in err
    assert "line 4: " in err and "outside the vocabulary" in err
    assert not (artifacts / "graphs").exists()
    with open_store(worker_store_config) as store:
        assert store.query(query) == [{"c": 0}]

    # without --strict the same lines are skipped and the good one is written
    assert main(_ingest_args(worker_model, prompts, artifacts)) == 0
    out = capsys.readouterr().out
    assert "graphs written:        1" in out and "bad lines skipped:     3" in out
    with open_store(worker_store_config) as store:
        assert store.query(query) == [{"c": 1}]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--store-batch-size", "-5", "must lie in 1..1000000, got -5"),
        ("--max-feature-nodes", "-1", "must be at least 0, got -1"),
        ("--node-threshold", "2", "must lie in (0, 1], got 2"),
        ("--edge-threshold", "0", "must lie in (0, 1], got 0"),
        ("--max-retry-seconds", "nan", "must be a finite number"),
    ],
)
def test_bad_settings_are_refused_before_any_prompt_is_read(
    worker_model, prompt_file, tmp_path, capsys, flag, value, message
):
    # Refused by the parser, not once per prompt line as a bad line with exit code 0.
    with pytest.raises(SystemExit) as exit_info:
        main(_ingest_args(worker_model, prompt_file, tmp_path / "artifacts", flag, value))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in err and "line 1" not in err
    assert not (tmp_path / "artifacts").exists()


def _spawn_worker(worker_model, prompt_file, artifacts, config: StoreConfig, *extra: str):
    env = {**os.environ, **store_env(config), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "service", *_ingest_args(worker_model, prompt_file, artifacts,
                                                          *extra)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_sigkill_while_writing_leaves_no_partial_graph_and_a_rerun_completes(
    worker_model, prompt_file, worker_store_config, tmp_path
):
    expected = _expected(worker_model, prompt_file)
    artifacts = tmp_path / "artifacts"
    with open_store(worker_store_config) as store:
        _wipe(store)
        proc = _spawn_worker(worker_model, prompt_file, artifacts, worker_store_config,
                             "--store-batch-size", "1")  # fmt: skip
        writing: str | None = None
        deadline = time.monotonic() + 120
        while writing is None and time.monotonic() < deadline and proc.poll() is None:
            rows = store.query("MATCH (g:Graph) WHERE g.status = 'writing' RETURN g.graph_id AS id")
            writing = rows[0]["id"] if rows else None
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert writing is not None, "the worker finished before a write could be interrupted"
        # The interrupted graph is invisible to readers.
        assert writing not in _complete_ids(store)
        with pytest.raises(NotFoundError):
            store.get_graph(writing)
        assert writing not in {s.graph_id for s in store.list_graphs(limit=100).items}

        proc = _spawn_worker(worker_model, prompt_file, artifacts, worker_store_config)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert _complete_ids(store) == set(expected)
        _assert_store_matches(store, expected)
        assert not list((artifacts / "claims").glob("*.claim"))


def test_ctrl_c_finishes_the_current_prompt_and_says_how_far_the_run_got(
    worker_model, prompt_file, worker_store_config, tmp_path
):
    artifacts = tmp_path / "artifacts"
    with open_store(worker_store_config) as store:
        _wipe(store)
        proc = _spawn_worker(worker_model, prompt_file, artifacts, worker_store_config)
        deadline = time.monotonic() + 120
        while not _complete_ids(store) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        written = len(_complete_ids(store))
        assert not store.query("MATCH (g:Graph) WHERE g.status <> 'complete' RETURN g")
    if proc.returncode == 0:
        pytest.fail("the worker finished before it could be interrupted")
    assert proc.returncode == 130, err
    assert "stopping after the current prompt" in err and "Traceback" not in err
    assert "rerun the same command to finish" in err
    # the summary counts exactly what is in the store: the run stopped between prompts
    counted = int(out.split("graphs written:")[1].split()[0])
    assert 1 <= counted == written < 6
    assert not list((artifacts / "claims").glob("*.claim"))


def test_two_workers_share_a_file_without_duplicating_work(
    worker_model, prompt_file, worker_store_config, tmp_path
):
    artifacts = tmp_path / "artifacts"
    with open_store(worker_store_config) as store:
        _wipe(store)
        procs = [
            _spawn_worker(worker_model, prompt_file, artifacts, worker_store_config)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        written = [
            int(line.split(":")[1]) for out, _ in outs for line in out.splitlines()
            if line.startswith("graphs written:")
        ]  # fmt: skip
        assert sum(written) == 6
        assert len(_complete_ids(store)) == 6


def test_store_outage_is_waited_out(worker_model, prompt_file, tmp_path):
    data_dir = tmp_path / "db"
    config = start(data_dir, heap="512m")
    artifacts = tmp_path / "artifacts"
    try:
        proc = _spawn_worker(worker_model, prompt_file, artifacts, config)
        with open_store(config) as store:
            deadline = time.monotonic() + 120
            while not _complete_ids(store) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _complete_ids(store), "no graph was written before the outage"
        # The worker holds connections open, which the server may wait out before it
        # stops: kill it after 10 s as a crashed server would be.
        stop(data_dir, timeout_s=10.0)
        # Longer than the driver's own retries (StoreConfig.retry_time_s, 5 s, whose last
        # backoff may end near 7 s): the outage must reach the worker's retry loop. The
        # server stops in a fraction of a second, so a 3 s pause was sometimes absorbed.
        time.sleep(StoreConfig().retry_time_s + 5.0)
        restarted = start(data_dir, heap="512m")
        assert restarted.uri == config.uri
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        with open_store(restarted) as store:
            assert len(_complete_ids(store)) == 6
        assert "retrying" in err
    finally:
        stop(data_dir)


def test_artifacts_of_a_killed_run_are_reused(
    worker_model, prompt_file, worker_store_config, tmp_path
):
    """An artifact on disk whose graph never reached the store is stored, not recomputed."""
    from ingest.attribution.artifact import save_artifact
    from ingest.worker.worker import IngestOptions, IngestWorker

    model, transcoders = worker_model
    computer = AttributionComputer.from_paths(str(model), transcoders, GraphSettings())
    calls: list[str] = []
    original = computer.compute

    def counting(spec: PromptSpec, graph_id: str):
        calls.append(graph_id)
        return original(spec, graph_id)

    computer.compute = counting  # type: ignore[method-assign]
    artifacts = tmp_path / "artifacts"
    spec = _specs(prompt_file)[0]
    gid = graph_key(computer.model_fingerprint, computer.set_id, spec, GraphSettings())
    save_artifact(original(spec, gid), artifacts / "graphs" / gid)
    with open_store(worker_store_config) as store:
        _wipe(store)
        summary = IngestWorker(
            store, computer, IngestOptions(artifacts_dir=artifacts, progress=False)
        ).run(prompt_file)
        assert summary.reused_artifacts == 1 and gid not in calls and len(calls) == 5
        assert len(summary.computed) == 6 and len(summary.bad_lines) == 1
        _assert_store_matches(store, {gid: _expected(worker_model, prompt_file)[gid]})


def test_only_a_graph_already_stored_counts_as_written_when_the_store_refuses(
    worker_model, prompt_file, worker_store_config, tmp_path, monkeypatch
):
    """A write that loses its claim (another writer or a delete took the graph id over)
    stored nothing: the worker must fail, not count the graph; a graph that another
    worker completed meanwhile (AlreadyExistsError) is the same graph and counts."""
    from ingest.worker.worker import IngestOptions, IngestWorker

    model, transcoders = worker_model
    computer = AttributionComputer.from_paths(str(model), transcoders, GraphSettings())
    one = tmp_path / "one.jsonl"
    one.write_text(prompt_file.read_text().splitlines()[0] + "\n")
    spec = _specs(one)[0]
    gid = graph_key(computer.model_fingerprint, computer.set_id, spec, GraphSettings())
    with open_store(worker_store_config) as store:
        _wipe(store)
        real = store.write_graph

        def taken_over(graph, **kw):
            def delete_midway(phase: str, done: int, total: int) -> None:
                if phase == "nodes" and done == 0:
                    store.delete_graph(graph.graph_id)

            return real(graph, on_batch=delete_midway, **kw)

        monkeypatch.setattr(store, "write_graph", taken_over)
        options = IngestOptions(artifacts_dir=tmp_path / "artifacts", progress=False)
        with pytest.raises(FailedPreconditionError) as lost:
            IngestWorker(store, computer, options).run(one)
        assert not isinstance(lost.value, AlreadyExistsError)
        assert gid not in _complete_ids(store)

        def finished_elsewhere(graph, **kw):
            real(graph)  # another worker stores the same graph first
            return real(graph, **kw)

        monkeypatch.setattr(store, "write_graph", finished_elsewhere)
        summary = IngestWorker(store, computer, options).run(one)
        assert summary.computed == [gid] and gid in _complete_ids(store)
