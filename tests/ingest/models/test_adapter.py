"""The generic forward against the real HF implementations, and its recording identities."""

from __future__ import annotations

import pytest
import torch

from ingest.errors import InvalidArgumentError
from ingest.models import Recording, adapter_from_hf
from tests.ingest.models.helpers import (
    ARCHS,
    PARALLEL,
    assert_logits_close,
    build,
    cached,
    random_ids,
    tolerance,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.float64]


def _hf_parts(model) -> list[tuple]:
    """Per layer: (attention-input norm, MLP-input norm, MLP) as HF modules."""
    if model.config.model_type == "gpt2":
        return [(b.ln_1, b.ln_2, b.mlp) for b in model.transformer.h]
    if model.config.model_type == "gpt_neox":
        return [
            (b.input_layernorm, b.post_attention_layernorm, b.mlp) for b in model.gpt_neox.layers
        ]
    return [(b.input_layernorm, b.post_attention_layernorm, b.mlp) for b in model.model.layers]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(arch: str, dtype: torch.dtype) -> None:
    model = cached(arch, dtype)
    adapter = adapter_from_hf(model)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
        got = adapter(ids)
    assert got.dtype == dtype
    assert got.shape == expected.shape
    assert expected.std() > 0.3  # far from a constant, so agreement means something
    # 1e-5 x logit scale in both dtypes: HF runs softmax (and Llama's RMSNorm) in float32
    # even for float64 models
    assert_logits_close(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_matches_hf_internals(arch: str) -> None:
    """Residual stream, attention patterns, norms and MLPs agree with HF module by module."""
    model = cached(arch, torch.float64)
    adapter = adapter_from_hf(model)
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
        rec = adapter(ids, record=True)
    assert isinstance(rec, Recording)
    for layer, (attn_norm, mlp_norm, mlp) in enumerate(_hf_parts(model)):
        # HF runs softmax and RMSNorm in float32 even for float64 models, hence 1e-5
        hf_tol = {"atol": 1e-5, "rtol": 0.0}
        torch.testing.assert_close(rec.resid_pre[layer], out.hidden_states[layer], **hf_tol)
        torch.testing.assert_close(rec.frozen.patterns[layer], out.attentions[layer], **hf_tol)
        with torch.no_grad():
            torch.testing.assert_close(
                rec.attn_in[layer], attn_norm(rec.resid_pre[layer]), **hf_tol
            )
            torch.testing.assert_close(rec.mlp_in[layer], mlp_norm(rec.resid_mid[layer]), **hf_tol)
            torch.testing.assert_close(rec.mlp_out[layer], mlp(rec.mlp_in[layer]), **hf_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_recording_identities(arch: str, dtype: torch.dtype) -> None:
    adapter = adapter_from_hf(cached(arch, dtype))
    ids = random_ids()
    with torch.no_grad():
        rec = adapter(ids, record=True)
        logits = adapter(ids)
    tol = {"atol": tolerance(dtype), "rtol": 0.0}
    assert torch.equal(rec.logits, logits)
    assert torch.equal(rec.resid_pre[0], adapter.embed(ids))
    for layer in range(adapter.n_layers):
        pre, mid, post = rec.resid_pre[layer], rec.resid_mid[layer], rec.resid_post[layer]
        if arch in PARALLEL:
            assert mid is pre
            torch.testing.assert_close(post, pre + rec.attn_out[layer] + rec.mlp_out[layer], **tol)
        else:
            torch.testing.assert_close(mid, pre + rec.attn_out[layer], **tol)
            torch.testing.assert_close(post, mid + rec.mlp_out[layer], **tol)
        if layer + 1 < adapter.n_layers:
            assert rec.resid_pre[layer + 1] is post
        torch.testing.assert_close(rec.mlp_out[layer], adapter.mlp(layer, rec.mlp_in[layer]))
        # the recorded denominators are the norms' definitions
        rms = arch.startswith("llama")
        for x, scale, norm in (
            (pre, rec.frozen.attn_norm_scale[layer], adapter.block(layer).attn_norm),
            (mid, rec.frozen.mlp_norm_scale[layer], adapter.block(layer).mlp_norm),
        ):
            spread = (
                x.pow(2).mean(-1, keepdim=True) if rms else x.var(-1, keepdim=True, unbiased=False)
            )
            torch.testing.assert_close(scale, torch.sqrt(spread + norm.eps), **tol)
        assert rec.frozen.patterns[layer].shape == (2, adapter.n_heads, 9, 9)
        torch.testing.assert_close(
            rec.frozen.patterns[layer].sum(-1), torch.ones(2, adapter.n_heads, 9, dtype=dtype)
        )
        assert torch.all(rec.frozen.patterns[layer].triu(1) == 0)  # causal
    expected = rec.final_normed @ adapter.W_U
    if adapter.b_U is not None:
        expected = expected + adapter.b_U
    torch.testing.assert_close(rec.logits, expected, **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_is_not_detached(arch: str) -> None:
    adapter = adapter_from_hf(cached(arch))
    resid0 = adapter.embed(random_ids()).requires_grad_(True)
    rec = adapter(resid0=resid0, record=True)
    for t in (rec.logits, rec.mlp_in[1], rec.mlp_out[0], rec.frozen.patterns[1], rec.final_normed):
        assert t.requires_grad
    (grad,) = torch.autograd.grad(rec.logits[0, -1, 3], resid0)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0


def test_dimensions_and_weight_references() -> None:
    model = cached("llama_tied")
    adapter = adapter_from_hf(model)
    assert adapter.family == "llama"
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp) == (2, 32, 48)
    assert (adapter.n_heads, adapter.n_kv_heads, adapter.d_head) == (4, 1, 12)
    assert (adapter.vocab_size, adapter.n_ctx) == (48, 16)
    assert adapter.W_E.shape == (48, 32) and adapter.W_U.shape == (32, 48)
    assert adapter.W_pos is None and adapter.b_U is None
    # tied embeddings: the unembedding is the embedding's transpose, no copy
    assert (
        adapter.W_U.data_ptr()
        == adapter.W_E.data_ptr()
        == model.model.embed_tokens.weight.data_ptr()
    )
    assert adapter.block(0).attn.W_Q.shape == (4, 32, 12)
    assert adapter.block(0).attn.W_K.shape == (1, 32, 12)

    gpt2 = adapter_from_hf(cached("gpt2"))
    assert gpt2.W_pos is not None and gpt2.W_pos.shape == (16, 32)
    untied = adapter_from_hf(cached("llama_gqa"))
    assert untied.W_U.data_ptr() != untied.W_E.data_ptr()
    assert (untied.n_heads, untied.n_kv_heads) == (4, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_is_as_accurate_as_hf(arch: str) -> None:
    """In bfloat16 the adapter stays within twice HF's own error against float64."""
    ids = random_ids(tokens=12)
    model = build(arch).to(torch.bfloat16)
    adapter = adapter_from_hf(model)
    with torch.no_grad():
        truth = adapter_from_hf(build(arch, torch.float64))(ids)
        hf_error = (model(ids).logits.double() - truth).abs().max()
        rec = adapter(ids, record=True)
        assert torch.equal(adapter(ids, frozen=rec.frozen), rec.logits)
    assert rec.logits.dtype == torch.bfloat16
    assert (rec.logits.double() - truth).abs().max() <= 2 * hf_error


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_sites_equal_the_recording_and_stop_after_the_last_layer(arch, monkeypatch):
    adapter = adapter_from_hf(cached(arch))
    ids = random_ids()
    with torch.no_grad():
        rec = adapter(ids, record=True)
        mlp_in, mlp_out = adapter.mlp_sites(ids, [1, 0])
    # the same computation, in the order asked for
    for got, layer in zip(mlp_in, [1, 0], strict=True):
        assert torch.equal(got, rec.mlp_in[layer])
    for got, layer in zip(mlp_out, [1, 0], strict=True):
        assert torch.equal(got, rec.mlp_out[layer])
    # layer 0 alone runs neither layer 1's MLP nor the unembedding
    ran: list[int] = []
    adapter.block(1).mlp.register_forward_hook(lambda *_: ran.append(1))
    monkeypatch.setattr(adapter, "unembed", lambda _: pytest.fail("unembedding ran"))
    with torch.no_grad():
        mlp_in, _ = adapter.mlp_sites(ids, [0])
    assert ran == [] and torch.equal(mlp_in[0], rec.mlp_in[0])


def test_mlp_sites_refuse_missing_layers() -> None:
    adapter = adapter_from_hf(cached("gpt2"))
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        adapter.mlp_sites(random_ids(), [5])
    with pytest.raises(InvalidArgumentError, match="at least one layer"):
        adapter.mlp_sites(random_ids(), [])
