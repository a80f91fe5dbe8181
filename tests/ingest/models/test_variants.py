"""Less common settings of the supported families, against HF and the identities."""

from __future__ import annotations

import pytest
import torch

from ingest.models import adapter_from_hf
from tests.ingest.models.helpers import VARIANTS, assert_logits_close, build, random_ids
from tests.ingest.models.identities import (
    assert_frozen_affine,
    assert_frozen_exact,
    assert_ov_reconstructs_attention,
    assert_recording_identities,
)

pytestmark = pytest.mark.unit


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_hf_and_identities(variant: str) -> None:
    ids = random_ids(tokens=12)
    model = build(variant)
    adapter = adapter_from_hf(model)
    with torch.no_grad():
        expected = model(ids).logits
        assert_logits_close(adapter(ids), expected)
    assert expected.std() > 0.3

    model64 = model.to(torch.float64)
    adapter64 = adapter_from_hf(model64)
    with torch.no_grad():
        rec = adapter64(ids, record=True)
    assert_recording_identities(adapter64, rec, 1e-10)
    assert_frozen_exact(adapter64, ids, rec)
    assert_frozen_affine(adapter64, rec, 1e-10)
    assert_ov_reconstructs_attention(adapter64, rec, 1e-10)


def test_sliding_window_limits_the_pattern() -> None:
    adapter = adapter_from_hf(build("qwen2_window"))
    with torch.no_grad():
        rec = adapter(random_ids(tokens=12), record=True)
    full, windowed = rec.frozen.patterns  # layer 0 full attention, layer 1 window 3
    assert adapter.block(0).attn.window is None and adapter.block(1).attn.window == 3
    assert torch.all(windowed.tril(-3) == 0) and torch.all(windowed.diagonal(-2, -2, -1) > 0)
    assert torch.all(full[..., -1, :] > 0)


@pytest.mark.parametrize(
    ("variant", "windows"),
    [
        ("mistral_window", [4, 4]),
        ("mistral_window_layer_types", [3, 3]),  # Mistral slides every layer
        ("qwen2_window", [None, 3]),  # from max_window_layers=1
        ("qwen2_layer_types", [3, None]),
        ("qwen2_window_off", [None, None]),
        ("llama_stray_window", [None, None]),  # Llama has no window
    ],
)
def test_sliding_windows_are_read_per_model_type(variant: str, windows: list[int | None]) -> None:
    adapter = adapter_from_hf(build(variant))
    assert [adapter.block(layer).attn.window for layer in range(adapter.n_layers)] == windows
