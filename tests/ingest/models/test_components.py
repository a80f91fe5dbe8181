"""The generic components' held-value paths against plain autograd."""

from __future__ import annotations

import pytest
import torch

from ingest.models.components import Norm
from ingest.models.weights import NormWeights


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_norm_with_a_held_scale_has_autograds_gradient(kind: str, dtype: torch.dtype) -> None:
    """With the denominator held, the norm's one-node backward equals autograd's through
    the same formula: centering (LayerNorm), division by the scale, the weight."""
    gen = torch.Generator().manual_seed(0)
    d = 16
    weight = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)
    norm_bias = bias if kind == "layernorm" else None
    norm = Norm(NormWeights(kind, weight, norm_bias, 1e-5))  # type: ignore[arg-type]
    x = (3 * torch.randn(4, 5, d, generator=gen, dtype=torch.float64) + 1).to(dtype)
    scale = norm.scale(x)  # held: no gradient flows into it
    grad_out = torch.randn(4, 5, d, generator=gen, dtype=torch.float64).to(dtype)

    held = x.clone().requires_grad_(True)
    out = norm(held, scale)
    (grad_held,) = torch.autograd.grad(out, held, grad_out)

    plain = x.clone().requires_grad_(True)
    expected = norm._normalize(plain, scale)
    (grad_plain,) = torch.autograd.grad(expected, plain, grad_out)

    assert out.dtype == dtype and grad_held.dtype == dtype
    assert torch.equal(out, expected)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert torch.allclose(grad_held.double(), grad_plain.double(), rtol=tol, atol=tol)
