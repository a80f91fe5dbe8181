"""The adapter's exactness identities as reusable assertions (for models from any source)."""

from __future__ import annotations

import torch

from ingest.models import ModelAdapter, Recording


def assert_recording_identities(adapter: ModelAdapter, rec: Recording, atol: float) -> None:
    """Residual bookkeeping, true MLPs on recorded inputs, and the unembedding."""
    tol = {"atol": atol, "rtol": 0.0}
    for layer, block in enumerate(adapter.iter_blocks()):
        pre, mid, post = rec.resid_pre[layer], rec.resid_mid[layer], rec.resid_post[layer]
        if block.parallel_residual:
            torch.testing.assert_close(mid, pre, **tol)
            torch.testing.assert_close(post, pre + rec.attn_out[layer] + rec.mlp_out[layer], **tol)
        else:
            torch.testing.assert_close(mid, pre + rec.attn_out[layer], **tol)
            torch.testing.assert_close(post, mid + rec.mlp_out[layer], **tol)
        torch.testing.assert_close(rec.mlp_out[layer], adapter.mlp(layer, rec.mlp_in[layer]), **tol)
    expected = rec.final_normed @ adapter.W_U
    if adapter.b_U is not None:
        expected = expected + adapter.b_U
    torch.testing.assert_close(rec.logits, expected, **tol)


def assert_frozen_exact(adapter: ModelAdapter, ids: torch.Tensor, rec: Recording) -> None:
    """A frozen forward fed the recorded state, and splicing true MLPs, change nothing."""
    true_mlps = {
        layer: (lambda x, layer=layer: adapter.mlp(layer, x)) for layer in range(adapter.n_layers)
    }
    with torch.no_grad():
        assert torch.equal(adapter(ids, frozen=rec.frozen), rec.logits)
        assert torch.equal(adapter(ids, mlp_replacements=true_mlps), rec.logits)


def assert_frozen_affine(adapter: ModelAdapter, rec: Recording, atol: float) -> None:
    """With frozen state and constant MLP outputs, resid0 -> logits is affine, and its
    linear part is what forward-mode differentiation gives."""
    constants = {layer: (lambda _x, c=out: c) for layer, out in enumerate(rec.mlp_out)}

    def f(resid0: torch.Tensor) -> torch.Tensor:
        return adapter(resid0=resid0, frozen=rec.frozen, mlp_replacements=constants)

    gen = torch.Generator().manual_seed(11)
    shape, dtype = rec.resid_pre[0].shape, rec.resid_pre[0].dtype
    a, b, c = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        lhs, rhs = f(a + b) - f(b), f(a + c) - f(c)
        scale = float(f(a).abs().max())
    torch.testing.assert_close(lhs, rhs, atol=atol * scale, rtol=0)
    _, jvp = torch.func.jvp(f, (b,), (a,))
    torch.testing.assert_close(jvp, lhs, atol=atol * scale, rtol=0)


def assert_ov_reconstructs_attention(adapter: ModelAdapter, rec: Recording, atol: float) -> None:
    for layer in range(adapter.n_layers):
        per_head = torch.einsum("btd,hde->bhte", rec.attn_in[layer], adapter.ov_matrices(layer))
        mixed = torch.einsum("bhqk,bhke->bqe", rec.frozen.patterns[layer], per_head)
        torch.testing.assert_close(
            rec.attn_out[layer], mixed + adapter.attn_bias(layer), atol=atol, rtol=0
        )
