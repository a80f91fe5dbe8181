"""Fixtures of the transcoder tests: one tiny trained zoo model per session."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A greater-than GPT-2 zoo checkpoint trained in seconds (``tiny=True``)."""
    from ingest.zoo.trainer import train_zoo_model

    out = tmp_path_factory.mktemp("zoo") / "greater_than-gpt2-tiny"
    train_zoo_model("greater_than", "gpt2", tiny=True, out_dir=out, progress=False)
    return out
