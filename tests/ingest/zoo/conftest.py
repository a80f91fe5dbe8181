"""Fixtures of the zoo tests: tiny checkpoints trained once per session."""

from pathlib import Path

import pytest

from ingest.zoo.trainer import ZooTrainResult, train_zoo_model


@pytest.fixture(scope="session")
def tiny_greater_than(tmp_path_factory: pytest.TempPathFactory) -> ZooTrainResult:
    """greater_than on gpt2 with the tiny configuration (a few seconds)."""
    out: Path = tmp_path_factory.mktemp("zoo") / "greater_than-gpt2-tiny"
    return train_zoo_model("greater_than", "gpt2", tiny=True, out_dir=out, progress=False)
