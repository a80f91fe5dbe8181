"""Freezing: the local replacement model's exactness identities (DESIGN 5.2, 5.4, 5.6)."""

from __future__ import annotations

import pytest
import torch

from ingest.models import FrozenState, ModelAdapter, adapter_from_hf
from tests.ingest.models.helpers import ARCHS, cached, random_ids, tolerance

pytestmark = pytest.mark.unit
# torch.func.jvp loads decompositions that torch itself scripts with a deprecated API
JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"

DTYPES = [torch.float32, torch.float64]


def _setup(arch: str, dtype: torch.dtype):
    adapter = adapter_from_hf(cached(arch, dtype))
    ids = random_ids()
    with torch.no_grad():
        rec = adapter(ids, record=True)
    # constant MLP outputs: the attribution setting, where every MLP is a leaf
    constants = {layer: (lambda _x, c=out: c) for layer, out in enumerate(rec.mlp_out)}
    return adapter, ids, rec, constants


def _frozen_logits(adapter: ModelAdapter, frozen: FrozenState, constants):
    return lambda r: adapter(resid0=r, frozen=frozen, mlp_replacements=constants)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_forward_reproduces_the_normal_forward(arch: str, dtype: torch.dtype) -> None:
    adapter, ids, rec, constants = _setup(arch, dtype)
    with torch.no_grad():
        frozen_rec = adapter(ids, frozen=rec.frozen, record=True)
        spliced = adapter(ids, frozen=rec.frozen, mlp_replacements=constants)
    assert torch.equal(frozen_rec.logits, rec.logits)
    for layer in range(adapter.n_layers):
        assert torch.equal(frozen_rec.attn_out[layer], rec.attn_out[layer])
        assert torch.equal(frozen_rec.mlp_in[layer], rec.mlp_in[layer])
    assert torch.equal(spliced, rec.logits)


@pytest.mark.filterwarnings(JIT_WARNING)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_map_from_resid0_is_affine(arch: str, dtype: torch.dtype) -> None:
    adapter, _, rec, constants = _setup(arch, dtype)
    f = _frozen_logits(adapter, rec.frozen, constants)
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(rec.resid_pre[0].shape, generator=gen, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        lhs = f(a + b) - f(b)
        rhs = f(a + c) - f(c)
        scale = f(a).abs().max()
    torch.testing.assert_close(lhs, rhs, atol=tolerance(dtype) * float(scale), rtol=0)
    # the same linear part by forward-mode differentiation
    _, jvp = torch.func.jvp(f, (b,), (a,))
    torch.testing.assert_close(jvp, lhs, atol=tolerance(dtype) * float(scale), rtol=0)
    # and the unfrozen model is not affine (the check above can fail)
    with torch.no_grad():
        g = lambda r: adapter(resid0=r)  # noqa: E731
        assert (g(a + b) - g(b) - (g(a + c) - g(c))).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_do_not_reach_frozen_values(arch: str) -> None:
    adapter, ids, _, constants = _setup(arch, torch.float64)
    source = adapter.embed(ids).requires_grad_(True)
    rec = adapter(resid0=source, record=True)  # frozen state still attached to `source`
    leafy = FrozenState(
        patterns=[p.detach().requires_grad_(True) for p in rec.frozen.patterns],
        attn_norm_scale=rec.frozen.attn_norm_scale,
        mlp_norm_scale=rec.frozen.mlp_norm_scale,
        final_norm_scale=rec.frozen.final_norm_scale.detach().requires_grad_(True),
    )
    resid0 = source.detach().clone().requires_grad_(True)
    logits = adapter(resid0=resid0, frozen=leafy, mlp_replacements=constants)
    target = torch.randn_like(logits)
    (logits * target).sum().backward()
    assert source.grad is None  # nothing flowed back through the recorded norm scales
    assert all(p.grad is None for p in leafy.patterns)
    assert leafy.final_norm_scale.grad is None
    assert resid0.grad is not None
    # the gradient is the affine map's linear part: <grad, v> == <target, f(r + v) - f(r)>
    v = torch.randn_like(resid0)
    with torch.no_grad():
        f = _frozen_logits(adapter, leafy, constants)
        moved = (target * (f(resid0 + v) - f(resid0))).sum()
    torch.testing.assert_close((resid0.grad * v).sum(), moved, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_one_frozen_state_drives_a_batch(arch: str) -> None:
    """One prompt's frozen state broadcast over a batch of injected vectors."""
    adapter = adapter_from_hf(cached(arch, torch.float64))
    ids = random_ids(batch=1)
    with torch.no_grad():
        rec = adapter(ids, record=True)
        constants = {0: lambda _x: rec.mlp_out[0]}  # (1, T, d), broadcast
        inject = torch.zeros(3, *rec.resid_pre[0].shape[1:], dtype=torch.float64)
        inject[1, 2] = 1.0
        inject[2, 4] = -2.0
        batch = adapter(
            resid0=rec.resid_pre[0] + inject, frozen=rec.frozen, mlp_replacements=constants
        )
        for i in range(3):
            single = adapter(
                resid0=rec.resid_pre[0] + inject[i : i + 1],
                frozen=rec.frozen,
                mlp_replacements=constants,
            )
            torch.testing.assert_close(batch[i : i + 1], single, atol=1e-12, rtol=0)
    torch.testing.assert_close(batch[0:1], rec.logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_final_normed_of_copies_is_the_recordings(arch: str) -> None:
    """What attribution differentiates: copies of one prompt through the frozen model stop
    at the final norm with the recording's value, each copy alike."""
    adapter = adapter_from_hf(cached(arch, torch.float64))
    with torch.no_grad():
        rec = adapter(random_ids(batch=1), record=True)
        constants = {layer: (lambda _x, c=out: c) for layer, out in enumerate(rec.mlp_out)}
        copies = rec.resid_pre[0].expand(3, -1, -1)
        final = adapter.frozen_final_normed(copies, rec.frozen, constants)
    assert final.shape == (3, *rec.final_normed.shape[1:])
    for i in range(3):
        torch.testing.assert_close(final[i : i + 1], rec.final_normed, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_ov_matrices_reconstruct_attention(arch: str, dtype: torch.dtype) -> None:
    adapter, _, rec, _ = _setup(arch, dtype)
    for layer in range(adapter.n_layers):
        ov = adapter.ov_matrices(layer)
        assert ov.shape == (adapter.n_heads, adapter.d_model, adapter.d_model)
        per_head = torch.einsum("btd,hde->bhte", rec.attn_in[layer], ov)  # (B, H, T, d)
        mixed = torch.einsum("bhqk,bhke->bqe", rec.frozen.patterns[layer], per_head)
        expected = mixed + adapter.attn_bias(layer)
        torch.testing.assert_close(rec.attn_out[layer], expected, atol=tolerance(dtype), rtol=0)


def test_frozen_state_of_the_wrong_shape_is_refused() -> None:
    """Every frozen tensor must be (1 or B, H, T, T) or (1 or B, T, 1): a pattern averaged
    over heads or one position's norm scale would broadcast silently, a state recorded on
    another prompt length would fail deep in the forward."""
    from ingest.errors import InvalidArgumentError

    adapter = adapter_from_hf(cached("llama_gqa"))
    ids = random_ids(batch=2, tokens=9)
    with torch.no_grad():
        frozen = adapter(ids, record=True).frozen.detach()

    def longer(s: torch.Tensor) -> torch.Tensor:  # the scale of a 10-token prompt
        return torch.cat([s, s[:, :1]], dim=1)

    P, A, M, F = (
        frozen.patterns, frozen.attn_norm_scale, frozen.mlp_norm_scale, frozen.final_norm_scale
    )  # fmt: skip
    cases = {
        "patterns\\[0\\]": ([p.mean(1, keepdim=True) for p in P], A, M, F),  # one head
        "patterns\\[1\\]": ([P[0], P[1][:, :, -1:]], A, M, F),  # one query row
        "patterns\\[0\\] has shape \\(4, 9, 9\\)": ([p[0] for p in P], A, M, F),  # no batch
        "attn_norm_scale\\[0\\]": (P, [s[:1, :1] for s in A], M, F),  # one position
        "attn_norm_scale\\[1\\]": (P, [A[0], longer(A[1])], M, F),
        "mlp_norm_scale\\[0\\]": (P, A, [s.expand(-1, -1, 32) for s in M], F),
        "final_norm_scale has shape \\(2, 10, 1\\)": (P, A, M, longer(F)),
        "final_norm_scale has shape \\(3, 9, 1\\)": (P, A, M, torch.cat([F, F[:1]])),
    }
    for message, fields in cases.items():
        bad = FrozenState(*fields)
        with pytest.raises(InvalidArgumentError, match=message):
            adapter(ids, frozen=bad)
        with pytest.raises(InvalidArgumentError, match=message):
            adapter.frozen_final_normed(adapter.embed(ids), bad)
    # batch 1 still broadcasts
    one = FrozenState([p[:1] for p in P], [s[:1] for s in A], [s[:1] for s in M], F[:1])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids, frozen=one)[:1], adapter(ids[:1]))
