"""The compact artifact: exact round trips and atomic writes."""

import json
import math
import os
import stat

import pytest
import torch

from ingest.attribution import artifact
from ingest.attribution.artifact import JSON_FILE, TENSORS_FILE, load_artifact, save_artifact
from ingest.attribution.export import write_json_atomic
from ingest.errors import InvalidArgumentError, NotFoundError

from .helpers import synthetic_result

pytestmark = pytest.mark.unit


def test_round_trip_is_exact(tmp_path) -> None:
    result = synthetic_result()
    result.metadata.extra["note"] = "x"
    out = save_artifact(result, tmp_path / "g1")
    assert sorted(p.name for p in out.iterdir()) == [JSON_FILE, TENSORS_FILE]
    back = load_artifact(out)
    assert back.metadata == result.metadata
    assert back.layout == result.layout
    assert back.nodes == result.nodes
    assert back.n_layers == result.n_layers and back.stats == result.stats
    assert torch.equal(back.adjacency, result.adjacency)
    assert back.adjacency.dtype == result.adjacency.dtype
    assert torch.equal(back.logit_probs, result.logit_probs)
    # The graphs derived from both are identical too.
    g1, g2 = result.to_graph(), back.to_graph()
    assert g1.nodes == g2.nodes and g1.edge_list() == g2.edge_list()


def test_existing_directory_needs_overwrite(tmp_path) -> None:
    first = synthetic_result(seed=0)
    second = synthetic_result(seed=1)
    save_artifact(first, tmp_path / "g")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        save_artifact(second, tmp_path / "g")
    assert torch.equal(load_artifact(tmp_path / "g").adjacency, first.adjacency)
    save_artifact(second, tmp_path / "g", overwrite=True)
    assert torch.equal(load_artifact(tmp_path / "g").adjacency, second.adjacency)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temporaries left


def test_failed_write_leaves_nothing(tmp_path) -> None:
    result = synthetic_result()
    result.stats["bad"] = math.nan
    with pytest.raises(InvalidArgumentError, match="JSON"):
        save_artifact(result, tmp_path / "g")
    result.stats["bad"] = object()
    with pytest.raises(InvalidArgumentError):
        save_artifact(result, tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_tensor_writer_failure_leaves_nothing(tmp_path) -> None:
    result = synthetic_result()
    result.adjacency = result.adjacency.to_sparse()  # safetensors cannot store sparse tensors
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        save_artifact(result, tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="not an attribution artifact"):
        load_artifact(tmp_path)
    out = save_artifact(synthetic_result(), tmp_path / "g")
    doc = json.loads((out / JSON_FILE).read_text())
    doc["format_version"] = 99
    (out / JSON_FILE).write_text(json.dumps(doc))
    with pytest.raises(InvalidArgumentError, match="format version"):
        load_artifact(out)


def test_outputs_take_the_process_umask(tmp_path) -> None:
    """Temporary names are the writers' own, not tempfile's private 0700/0600 ones, so a
    service or a user other than the writer can read what it wrote."""
    before = os.umask(0o022)
    try:
        out = save_artifact(synthetic_result(), tmp_path / "g")
        js = write_json_atomic({"a": 1}, tmp_path / "graph.json")
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE(js.stat().st_mode) == 0o644


def test_a_failed_replacement_puts_the_old_artifact_back(tmp_path, monkeypatch) -> None:
    first, second = synthetic_result(seed=0), synthetic_result(seed=1)
    save_artifact(first, tmp_path / "g")
    real_replace = os.replace

    def failing(src, dst):  # the new artifact cannot be moved in (e.g. a full disk)
        if str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        save_artifact(second, tmp_path / "g", overwrite=True)
    monkeypatch.undo()
    assert torch.equal(load_artifact(tmp_path / "g").adjacency, first.adjacency)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
