"""Worker test fixtures: a tiny zoo model with tiny transcoders, a prompt file, and an
embedded graph server of the worker tests' own (the outage test stops and restarts it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.store import StoreConfig
from ingest.store.embedded import embedded_server


@pytest.fixture(scope="session")
def worker_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model dir, transcoder dir): greater-than on GPT-2, trained in seconds."""
    from ingest.zoo.trainer import train_zoo_model
    from service.cli import main

    root = tmp_path_factory.mktemp("worker-model")
    model = root / "greater_than-gpt2-tiny"
    train_zoo_model("greater_than", "gpt2", tiny=True, out_dir=model, progress=False)
    transcoders = root / "tc"
    args = ["transcoders", "train", "--model", str(model), "--out", str(transcoders),
            "--width", "32", "--sparsity", "4", "--steps", "24", "--batch-size", "32",
            "--buffer-rows", "256", "--no-eval"]  # fmt: skip
    assert main(args) == 0
    return model, transcoders


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six greater-than prompts from the task's held-out split and one bad line."""
    from ingest.zoo.tasks import get_task

    task = get_task("greater_than")
    examples = task.examples("heldout")[:6]
    lines = [json.dumps({"prompt": ex.prompt, "task": "greater_than"}) for ex in examples]
    lines.insert(2, "{this is not json")
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def worker_store_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreConfig]:
    with embedded_server(tmp_path_factory.mktemp("worker-db"), heap="512m") as config:
        yield config


def store_env(config: StoreConfig) -> dict[str, str]:
    """The environment that points ``open_store()`` at ``config``'s server."""
    assert config.uri is not None and config.password is not None
    return {
        "NEO4J_URI": config.uri,
        "NEO4J_USER": config.user,
        "NEO4J_PASSWORD": config.password,
        "NEO4J_DATABASE": config.database,
    }
