"""The adapter on trained task-zoo checkpoints: load, match HF, and the exactness identities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ingest.models import load_model
from ingest.zoo.tasks import get_task
from ingest.zoo.trainer import train_zoo_model
from tests.ingest.models.helpers import assert_logits_close
from tests.ingest.models.identities import (
    assert_frozen_affine,
    assert_frozen_exact,
    assert_ov_reconstructs_attention,
    assert_recording_identities,
)

pytestmark = pytest.mark.slow

ZOO_ARCHS = ["gpt2", "neox", "llama"]


@pytest.fixture(scope="module", params=ZOO_ARCHS)
def zoo_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny two-layer greater-than model of one architecture, trained for a few steps."""
    out = tmp_path_factory.mktemp("zoo") / request.param
    train_zoo_model(
        "greater_than",
        request.param,
        tiny=True,
        steps=25,
        shape_overrides={"n_layers": 2},
        out_dir=out,
        progress=False,
    )
    return out


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_zoo_checkpoint_identities(zoo_checkpoint: Path) -> None:
    prompts = [e.prompt for e in get_task("greater_than").examples("heldout")[:3]]
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        loaded = load_model(str(zoo_checkpoint), dtype=dtype)
        adapter, model = loaded.adapter, loaded.hf_model
        assert model is not None
        ids = loaded.tokenizer(prompts, return_tensors="pt", padding=True).input_ids
        with torch.no_grad():
            rec = adapter(ids, record=True)
            assert_logits_close(rec.logits, model(ids).logits)
        assert_recording_identities(adapter, rec, atol)
        assert_frozen_exact(adapter, ids, rec)
        assert_frozen_affine(adapter, rec, atol)
        assert_ov_reconstructs_attention(adapter, rec, atol)


def test_zoo_right_padding_keeps_real_positions(zoo_checkpoint: Path) -> None:
    """Right-padded batches are exact at the real tokens (the documented padding rule)."""
    loaded = load_model(str(zoo_checkpoint))
    prompts = ["The war lasted from the year 1732 to the year 17", "The war lasted"]
    batch = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = loaded.adapter(batch.input_ids)
        for row, length in enumerate(batch.attention_mask.sum(1).tolist()):
            alone = loaded.adapter(batch.input_ids[row : row + 1, :length])
            torch.testing.assert_close(padded[row : row + 1, :length], alone, atol=1e-5, rtol=0)
