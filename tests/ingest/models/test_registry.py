"""Family registry, input validation and fingerprints."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from ingest.errors import InvalidArgumentError
from ingest.models import (
    FrozenState,
    adapter_from_hf,
    get_family,
    register_family,
    supported_model_types,
)
from tests.ingest.models.helpers import N_CTX, VOCAB, build, cached, random_ids

pytestmark = pytest.mark.unit


def test_builtin_families_are_registered() -> None:
    assert {"gpt2", "gpt_neox", "llama"} <= set(supported_model_types())
    assert get_family("gpt_neox").name == "gpt_neox"


def test_unknown_model_type_lists_the_supported_ones() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unsupported model_type 'bert'.*gpt2.*llama"):
        get_family("bert")


def test_duplicate_registration_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_family("my_llama", "llama")(get_family("llama").convert)
    assert get_family("llama").name == "llama"


def test_unsupported_hf_model_is_rejected() -> None:
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
        num_attention_heads=2, max_position_embeddings=N_CTX, word_embed_proj_dim=16,
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="unsupported model_type 'opt'"):
        adapter_from_hf(OPTForCausalLM(cfg))


def test_base_model_without_head_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="AutoModelForCausalLM"):
        adapter_from_hf(cached("llama_gqa").model)


def test_input_validation() -> None:
    adapter = adapter_from_hf(cached("gpt2"))
    ids = random_ids()
    cases = [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(1, N_CTX + 1, dtype=torch.long)}, "context is 16"),
        ({"input_ids": torch.tensor([[1, VOCAB]])}, r"\[0, 48\)"),
        ({"input_ids": torch.tensor([[-1, 2]])}, r"\[0, 48\)"),
        ({"input_ids": torch.tensor([1, 2])}, "batch dimension"),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer"),
        ({}, "input_ids"),
        ({"input_ids": ids, "resid0": adapter.embed(ids)}, "not both"),
        ({"resid0": torch.zeros(1, 3, 7)}, "resid0 must have shape"),
        ({"resid0": torch.zeros(1, N_CTX + 1, 32)}, "context"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            adapter(**kwargs)
    with torch.no_grad():
        rec = adapter(ids, record=True)
    short = FrozenState(
        rec.frozen.patterns[:1], rec.frozen.attn_norm_scale, rec.frozen.mlp_norm_scale,
        rec.frozen.final_norm_scale,
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="2 layers"):
        adapter(ids, frozen=short)
    with pytest.raises(InvalidArgumentError, match="same prompt"):
        adapter(ids[:, :5], frozen=rec.frozen)
    with pytest.raises(InvalidArgumentError, match="layers 0 to 1"):
        adapter.ov_matrices(2)


def test_fingerprint_follows_weights_and_architecture_not_precision() -> None:
    a32 = adapter_from_hf(cached("llama_gqa", torch.float32))
    a64 = adapter_from_hf(cached("llama_gqa", torch.float64))
    fp = a32.fingerprint()
    assert len(fp) == 64
    assert fp == a64.fingerprint() == adapter_from_hf(build("llama_gqa")).fingerprint()
    assert fp != adapter_from_hf(build("llama_gqa", seed=1)).fingerprint()
    assert fp != adapter_from_hf(cached("llama_tied")).fingerprint()
    model = build("llama_gqa")
    adapter = adapter_from_hf(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    # the adapter references the model's weights, so the edit shows in both
    assert adapter.fingerprint() != fp
    assert adapter_from_hf(model).fingerprint() == adapter.fingerprint()
