"""Evaluation identities on a real model whose MLPs a ReLU transcoder can copy exactly."""

import math

import pytest
import torch

from ingest.models import adapter_from_hf
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.evaluation import evaluate_set, fraction_kept
from ingest.transcoders.formats.common import per_layer_module
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet
from tests.ingest.transcoders.helpers import D_MODEL, random_stream_source, tiny_gpt2

pytestmark = pytest.mark.unit


def _relu_model_and_sets():
    model = tiny_gpt2(seed=1, act="relu")
    with torch.no_grad():  # make ablation matter: larger MLP outputs
        for block in model.transformer.h:
            block.mlp.c_proj.weight.mul_(4.0)
    adapter = adapter_from_hf(model)
    d_mlp = 4 * D_MODEL
    cfg = TranscoderConfig(arch="relu", d_in=D_MODEL, d_out=D_MODEL, d_transcoder=d_mlp, sparsity=0)
    perfect, zero = {}, {}
    for layer, block in enumerate(model.transformer.h):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        perfect[layer] = per_layer_module(cfg, fc.weight.T, fc.bias, proj.weight, proj.bias)
        zero[layer] = per_layer_module(
            cfg, fc.weight.T, fc.bias, torch.zeros(d_mlp, D_MODEL), torch.zeros(D_MODEL)
        )

    def wrap(modules):
        meta = SetMetadata(
            kind="transcoder", model_id="relu-gpt2", model_fingerprint=adapter.fingerprint(),
            n_layers=2, d_model=D_MODEL, layers=[0, 1], config=cfg,
        )  # fmt: skip
        return TranscoderSet(meta, modules)

    return adapter, wrap(perfect), wrap(zero)


def test_perfect_transcoder_recovers_all_and_zero_recovers_nothing():
    adapter, perfect, zero = _relu_model_and_sets()
    source = random_stream_source(n_tokens=2048)
    good = evaluate_set(adapter, perfect, source, n_windows=8)
    bad = evaluate_set(adapter, zero, source, n_windows=8)
    for layer in ("0", "1"):
        assert good["layers"][layer]["fvu"] < 1e-10
        assert math.isclose(good["layers"][layer]["ce_loss_recovered"], 1.0, abs_tol=1e-4)
        assert abs(good["layers"][layer]["kl"]) < 1e-6
        assert math.isclose(bad["layers"][layer]["ce_loss_recovered"], 0.0, abs_tol=1e-4)
    assert math.isclose(good["all_layers"]["ce_loss_recovered"], 1.0, abs_tol=1e-4)
    assert abs(good["all_layers"]["delta_loss"]) < 1e-5
    assert math.isclose(bad["all_layers"]["ce_loss_recovered"], 0.0, abs_tol=1e-4)
    assert bad["all_layers"]["delta_loss"] > 0
    # The ReLU "transcoder" fires exactly when the MLP's neurons do.
    assert 0 < good["mean"]["l0"] < 4 * D_MODEL


def test_set_for_another_model_is_rejected():
    from ingest.errors import InvalidArgumentError

    _, perfect, _ = _relu_model_and_sets()
    other = adapter_from_hf(tiny_gpt2(seed=5))
    with pytest.raises(InvalidArgumentError, match="weights differ"):
        evaluate_set(other, perfect, random_stream_source(), n_windows=2)


def test_dead_latents_are_counted_over_a_large_sample_not_the_few_eval_windows():
    adapter, perfect, _ = _relu_model_and_sets()
    source = random_stream_source(n_tokens=20_000)
    eval_tokens = source.n_windows("eval") * source.width
    few = evaluate_set(adapter, perfect, source, n_windows=1, dead_tokens=0)
    many = evaluate_set(adapter, perfect, source, n_windows=1, dead_tokens=10**6)
    assert few["dead_tokens"] == source.width
    assert many["dead_tokens"] == eval_tokens
    # A latent that fires anywhere in the larger sample is not dead: the count can only
    # fall, and on 16 tokens some of the 32 ReLU neurons never fire while on 2,000 they do.
    assert many["mean"]["dead_fraction"] < few["mean"]["dead_fraction"]
    # The other metrics still come from the requested eval windows alone.
    assert many["tokens"] == few["tokens"] == source.width
    assert many["mean"]["fvu"] == few["mean"]["fvu"]


def test_fraction_kept_is_below_one_when_the_splice_is_worse_either_way():
    # Higher is better (a logit difference): 18 -> 9 keeps half.
    assert fraction_kept(18.0, 9.0, higher_is_better=True) == pytest.approx(0.5)
    # Lower is better (induction's loss ratio): 0.002 -> 0.014 is worse, keeps 1/7.
    assert fraction_kept(0.002, 0.014, higher_is_better=False) == pytest.approx(1 / 7)
    # A better splice keeps more than 1 in both directions.
    assert fraction_kept(0.014, 0.002, higher_is_better=False) == pytest.approx(7.0)
    assert math.isnan(fraction_kept(0.0, 1.0))
