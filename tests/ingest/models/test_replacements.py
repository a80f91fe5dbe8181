"""MLP replacements: splicing, ablation, and what the recording shows."""

from __future__ import annotations

import pytest
import torch

from ingest.errors import InvalidArgumentError
from ingest.models import adapter_from_hf
from tests.ingest.models.helpers import ARCHS, cached, random_ids

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_true_mlp_as_replacement_reproduces_logits(arch: str, dtype: torch.dtype) -> None:
    adapter = adapter_from_hf(cached(arch, dtype))
    ids = random_ids()
    true = {layer: (lambda x, layer=layer: adapter.mlp(layer, x)) for layer in range(2)}
    with torch.no_grad():
        assert torch.equal(adapter(ids, mlp_replacements=true), adapter(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_ablation_changes_logits_and_is_recorded(arch: str) -> None:
    adapter = adapter_from_hf(cached(arch))
    ids = random_ids()
    with torch.no_grad():
        clean = adapter(ids, record=True)
        ablated = adapter(ids, mlp_replacements={0: torch.zeros_like}, record=True)
    assert torch.equal(ablated.mlp_out[0], torch.zeros_like(clean.mlp_out[0]))
    assert (ablated.logits - clean.logits).abs().max() > 1e-3
    # layers before the replacement are untouched; layer 1 sees the changed residual
    assert torch.equal(ablated.attn_out[0], clean.attn_out[0])
    assert not torch.allclose(ablated.mlp_in[1], clean.mlp_in[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_replacement_output_is_what_the_model_uses(arch: str) -> None:
    adapter = adapter_from_hf(cached(arch, torch.float64))
    ids = random_ids()
    seen: list[torch.Tensor] = []

    def replacement(mlp_in: torch.Tensor) -> torch.Tensor:
        seen.append(mlp_in)
        return 0.5 * mlp_in.flip(-1)

    with torch.no_grad():
        rec = adapter(ids, mlp_replacements={1: replacement}, record=True)
        clean = adapter(ids, record=True)
    assert seen[0] is rec.mlp_in[1]
    torch.testing.assert_close(rec.mlp_out[1], 0.5 * rec.mlp_in[1].flip(-1))
    torch.testing.assert_close(rec.mlp_in[1], clean.mlp_in[1])  # layer 0 unchanged
    # the logits follow from the replaced output: resid_post[1] -> final norm -> unembed
    delta = rec.mlp_out[1] - clean.mlp_out[1]
    torch.testing.assert_close(rec.resid_post[1], clean.resid_post[1] + delta)


def test_replacement_errors() -> None:
    adapter = adapter_from_hf(cached("gpt2"))
    ids = random_ids()
    with pytest.raises(InvalidArgumentError, match="layer 5"):
        adapter(ids, mlp_replacements={5: torch.zeros_like})
    with pytest.raises(InvalidArgumentError, match="broadcast"):
        adapter(ids, mlp_replacements={0: lambda x: x[..., :3]})
    with pytest.raises(InvalidArgumentError, match="not a tensor"):
        adapter(ids, mlp_replacements={0: lambda x: None})
