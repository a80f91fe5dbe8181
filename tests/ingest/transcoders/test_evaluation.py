"""Evaluation identities on a real model whose MLPs a ReLU transcoder can copy exactly."""

import math

import pytest
import torch

from ingest.models import adapter_from_hf
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.evaluation import (
    counted_positions,
    evaluate_set,
    fraction_kept,
    kl_divergence,
    kl_rows,
    next_token_ce,
    recovered_interval,
    window_ce,
)
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
        assert good["layers"][layer]["fvu_predicting"] < 1e-10
        assert math.isclose(good["layers"][layer]["ce_loss_recovered"], 1.0, abs_tol=1e-4)
        assert abs(good["layers"][layer]["kl"]) < 1e-6
        assert math.isclose(bad["layers"][layer]["ce_loss_recovered"], 0.0, abs_tol=1e-4)
    assert math.isclose(good["all_layers"]["ce_loss_recovered"], 1.0, abs_tol=1e-4)
    assert abs(good["all_layers"]["delta_loss"]) < 1e-5
    assert math.isclose(bad["all_layers"]["ce_loss_recovered"], 0.0, abs_tol=1e-4)
    assert bad["all_layers"]["delta_loss"] > 0
    # The ReLU "transcoder" fires exactly when the MLP's neurons do.
    assert 0 < good["mean"]["l0"] < 4 * D_MODEL
    assert good["all_layers"]["top1_agreement"] == 1.0
    assert all(good["layers"][layer]["top1_agreement"] == 1.0 for layer in ("0", "1"))
    # With every MLP zeroed, agreement is the share of predictions the ablated model keeps.
    windows = source.get("eval", 0, 8)
    keep = counted_positions(windows.mask, windows.scored)
    with torch.no_grad():
        clean = adapter(windows.ids)[:, :-1][keep].argmax(-1)
        zeros = {layer: torch.zeros_like for layer in (0, 1)}
        ablated = adapter(windows.ids, mlp_replacements=zeros)[:, :-1][keep].argmax(-1)
    expected = float((clean == ablated).double().mean())
    assert 0 < expected < 1
    assert bad["all_layers"]["top1_agreement"] == pytest.approx(expected, abs=1e-12)


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


def test_cross_entropy_counts_only_the_scored_predictions():
    """On a source trained on the answer alone, CE is the answer's loss and nothing else."""
    from ingest.transcoders.sources import PromptSource

    adapter, _, zero = _relu_model_and_sets()
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 9, 7, 12, 6, 8]
    rows = [torch.randint(1, 40, (n,), generator=gen).tolist() for n in lengths]
    answer_only = PromptSource("answers", rows, rows, answer_only=True)
    every = PromptSource("every", rows, rows)
    windows = answer_only.get("eval", 0, len(rows))
    with torch.no_grad():
        logp = torch.log_softmax(adapter(windows.ids).double(), -1)
        mlp_out = adapter(windows.ids, record=True).mlp_out[0].double()
    expected = -sum(float(logp[i, n - 2, rows[i][-1]]) for i, n in enumerate(lengths))
    expected_all = -sum(
        float(logp[i, t - 1, rows[i][t]]) for i, n in enumerate(lengths) for t in range(1, n)
    )
    for source, ce, count, positions in (
        (answer_only, expected, len(rows), "answer"),
        (every, expected_all, sum(lengths) - len(rows), "all"),
    ):
        report = evaluate_set(adapter, zero, source, n_windows=len(rows), dead_tokens=0)
        if positions == "answer":
            report_answer = report
        assert report["ce_positions"] == positions and report["ce_predictions"] == count
        assert report["layers"]["0"]["ce_clean"] == pytest.approx(ce / count, rel=1e-5)
        # Zero-ablation's loss is counted on the same positions: nothing recovered.
        assert report["layers"]["0"]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    # FVU where the answer is predicted: the last prompt token of each row (here the
    # estimate is 0, so FVU = sum |y|^2 / sum |y - mean y|^2 over those rows).
    y = torch.stack([mlp_out[i, n - 2] for i, n in enumerate(lengths)])
    expected_fvu = float(y.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert report_answer["layers"]["0"]["fvu_predicting"] == pytest.approx(expected_fvu, rel=1e-6)


def test_train_split_measures_the_windows_trained_on():
    from ingest.transcoders.sources import PromptSource

    adapter, _, zero = _relu_model_and_sets()
    gen = torch.Generator().manual_seed(4)
    train = [torch.randint(1, 40, (n,), generator=gen).tolist() for n in (6, 9, 5)]
    held = [torch.randint(1, 40, (n,), generator=gen).tolist() for n in (7, 8)]
    source = PromptSource("split", train, held, answer_only=True)
    for split, rows in (("train", train), ("eval", held)):
        report = evaluate_set(adapter, zero, source, split=split, dead_tokens=10**6)
        width = max(len(r) for r in train + held)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logp = torch.log_softmax(adapter(ids).double(), -1)
        ce = -sum(float(logp[i, len(r) - 2, r[-1]]) for i, r in enumerate(rows)) / len(rows)
        assert report["split"] == split
        assert report["tokens"] == report["dead_tokens"] == sum(len(r) for r in rows)
        assert report["layers"]["0"]["ce_clean"] == pytest.approx(ce, rel=1e-6)


def test_fraction_kept_is_measured_from_the_no_ability_baseline():
    # Higher is better, baseline 0 (a logit difference): 18 -> 9 keeps half.
    assert fraction_kept(18.0, 9.0) == pytest.approx(0.5)
    # Induction's loss ratio is 1 without induction: 0.002 -> 0.014 is worse and keeps
    # 0.986 / 0.998 of the drop from 1; back at 1 it keeps nothing.
    assert fraction_kept(0.002, 0.014, baseline=1.0) == pytest.approx(0.986 / 0.998)
    assert fraction_kept(0.002, 1.0, baseline=1.0) == pytest.approx(0.0)
    # A better splice keeps more than all of it, in both directions.
    assert fraction_kept(0.014, 0.002, baseline=1.0) > 1.0
    assert fraction_kept(9.0, 18.0) == pytest.approx(2.0)
    assert math.isnan(fraction_kept(0.0, 1.0))
    assert math.isnan(fraction_kept(1.0, 0.5, baseline=1.0))


def test_confident_predictions_keep_their_loss_and_kl_to_many_digits():
    """A prediction at probability 1 - 1e-5 (the IOI model's answers) has a loss of about
    1e-5 nats; splicing an MLP moves it by 1e-7. The loss and KL must resolve that:
    float32's log-softmax is off by ~1e-6 nats there."""
    gen = torch.Generator().manual_seed(0)
    vocab, n = 50, 64
    logits = torch.randn(1, n + 1, vocab, generator=gen)
    ids = torch.randint(0, vocab, (1, n + 1), generator=gen)
    # the next token leads every other logit by 16: p(answer) = 1 - ~1e-5
    logits[0, torch.arange(n), ids[0, 1:]] = logits[0, :n].max(-1).values + 16.0
    shifted = logits.clone()
    shifted[0, :, 0] += 0.01  # another logit moves a little: the loss moves by ~1e-9
    keep = torch.ones(1, n, dtype=torch.bool)

    def exact(x: torch.Tensor) -> float:  # log(1 + sum_{i != answer} e^(x_i - x_answer))
        x = x[0, :n].double()
        answer = x.gather(-1, ids[0, 1:, None])
        others = (x - answer).exp().sum(-1) - 1.0
        return float(torch.log1p(others).sum())

    for x in (logits, shifted):
        assert float(next_token_ce(x, ids, keep)) == pytest.approx(exact(x), rel=1e-9)
    delta = float(next_token_ce(shifted, ids, keep) - next_token_ce(logits, ids, keep))
    assert delta == pytest.approx(exact(shifted) - exact(logits), rel=1e-6)
    p = torch.softmax(logits[0, :n].double(), -1)
    q = torch.softmax(shifted[0, :n].double(), -1)
    expected_kl = float((p * (p / q).log()).sum())
    assert expected_kl > 0
    assert float(kl_divergence(logits, shifted, keep)) == pytest.approx(expected_kl, rel=1e-6)


def test_kl_gives_tokens_with_minus_infinite_logits_no_weight():
    """A model may put -inf in its logits (vocabulary padding): p log(p / q) of such a
    token is 0 log 0 = 0, so the KL is that over the other tokens, and its gradient is
    finite (the end-to-end steps train through it)."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 7, generator=gen)
    other = torch.randn(1, 4, 7, generator=gen)
    keep = torch.ones(1, 3, dtype=torch.bool)
    padded = [torch.cat([x, torch.full((1, 4, 2), float("-inf"))], -1) for x in (clean, other)]
    expected = float(kl_divergence(clean, other, keep))
    assert float(kl_divergence(*padded, keep)) == pytest.approx(expected, rel=1e-12)
    q_logits = padded[1][0, :3].clone().requires_grad_()
    log_p = torch.log_softmax(padded[0][0, :3], -1)
    kl_rows(log_p, torch.log_softmax(q_logits, -1)).mean().backward()
    assert q_logits.grad is not None and bool(q_logits.grad.isfinite().all())
    # q giving no probability where p gives some: infinitely far, not nan
    blocked = padded[1].clone()
    blocked[0, 0, 0] = float("-inf")
    assert float(kl_divergence(padded[0], blocked, keep)) == float("inf")


def test_ce_recovered_interval_brackets_the_estimate_and_widens_when_ablation_barely_matters():
    adapter, perfect, zero = _relu_model_and_sets()
    source = random_stream_source(n_tokens=2048)
    for tset, value in ((perfect, 1.0), (zero, 0.0)):
        report = evaluate_set(adapter, tset, source, n_windows=8)
        for part in (*report["layers"].values(), report["all_layers"]):
            lo, hi = part["ce_loss_recovered_95"]
            assert lo - 1e-4 <= part["ce_loss_recovered"] <= hi + 1e-4
            # a perfect or a zero splice recovers all or nothing in every resample too
            assert lo == pytest.approx(value, abs=1e-4) and hi == pytest.approx(value, abs=1e-4)
    # Windows whose ablation moves the loss by 1 nat against ones that move it by 0.01:
    # a splice that recovers 90% in each window, with noise of 0.005 nats per window.
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(500, generator=gen, dtype=torch.float64)
    noise = 0.005 * torch.randn(500, generator=gen, dtype=torch.float64)
    intervals = {}
    for effect in (1.0, 0.01):
        ablate = clean + effect
        splice = clean + 0.1 * effect + noise
        intervals[effect] = recovered_interval(clean, splice, ablate)
        assert intervals[effect][0] < 0.9 < intervals[effect][1]
    widths = {e: hi - lo for e, (lo, hi) in intervals.items()}
    assert widths[1.0] < 0.002 and widths[0.01] > 0.05
    assert recovered_interval(clean, splice, ablate) == intervals[0.01]  # deterministic


def test_window_ce_sums_each_windows_counted_positions():
    adapter, _, _ = _relu_model_and_sets()
    windows = random_stream_source(n_tokens=2048).get("eval", 0, 4)
    keep = counted_positions(windows.mask, windows.scored)
    keep[1] = False  # a window with nothing counted contributes 0
    with torch.no_grad():
        logits = adapter(windows.ids)
    per_window = window_ce(logits, windows.ids, keep)
    assert per_window.shape == (4,) and per_window[1] == 0
    for b in (0, 2, 3):
        one = torch.zeros_like(keep)
        one[b] = keep[b]
        assert float(per_window[b]) == pytest.approx(float(next_token_ce(logits, windows.ids, one)))
    assert float(per_window.sum()) == pytest.approx(float(next_token_ce(logits, windows.ids, keep)))
