"""Meaning of the modules: sparsity of each architecture, gradients, CLT wiring, set API."""

import pytest
import torch

from ingest.errors import InvalidArgumentError
from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import ARCHITECTURES, TranscoderConfig
from ingest.transcoders.registry import Registry
from ingest.transcoders.resampling import resample_transcoder
from ingest.transcoders.transcoder import Transcoder
from tests.ingest.transcoders.helpers import (
    D_MODEL,
    D_T,
    config,
    make_set,
    randomize,
    tiny_adapter,
)

pytestmark = pytest.mark.unit


def test_registry_rejects_duplicates_and_names_choices():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(InvalidArgumentError, match="already registered"):
        reg.add("a", 2)
    with pytest.raises(InvalidArgumentError, match="choose one of a"):
        reg.get("b")
    assert ARCHITECTURES.names() == ["batchtopk", "jumprelu", "relu", "topk"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gelu"}, "unknown architecture"),
        ({"d_transcoder": 0}, "d_transcoder must be a positive integer"),
        ({"arch": "topk", "sparsity": 2.5}, "must be an integer"),
        ({"arch": "topk", "sparsity": 100}, "must be an integer"),
        ({"sparsity": -1.0}, "sparsity"),
    ],
)
def test_config_is_validated_on_construction(kwargs, message):
    base = {"arch": "relu", "d_in": 4, "d_out": 4, "d_transcoder": 8, "sparsity": 1.0}
    with pytest.raises(InvalidArgumentError, match=message):
        TranscoderConfig(**{**base, **kwargs})


def test_topk_l0_equals_k():
    module = Transcoder(config("topk"))
    randomize(module)
    with torch.no_grad():
        module.b_enc.add_(10.0)  # every pre-activation positive: exactly k survive
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(0))
    acts = module.encode(x)
    assert ((acts > 0).sum(-1) == module.cfg.k).all()
    top = module.pre_activations(x).topk(module.cfg.k, dim=-1).values
    torch.testing.assert_close(acts.topk(module.cfg.k, dim=-1).values, top)


def test_batchtopk_keeps_n_k_per_batch_and_infers_at_its_threshold():
    module = Transcoder(config("batchtopk"))
    randomize(module)
    with torch.no_grad():
        module.threshold.zero_()  # as built: set by the first training batch
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(0))
    pre = module.pre_activations(x).detach()
    parts = module.loss(x, torch.randn(64, D_MODEL), dead=None)
    # the batch's N k largest positive pre-activations, however they fall over tokens
    kept = torch.relu(pre).flatten().topk(64 * module.cfg.k).values
    assert parts.l0 == 64 * module.cfg.k / 64
    assert module.threshold.eq(kept.min()).all()
    # a token encodes without its batch: JumpReLU at the threshold
    acts = module.encode(x[:1]).detach()
    torch.testing.assert_close(acts, pre[:1] * (pre[:1] > kept.min()))
    assert not module.threshold.requires_grad
    # the running average moves towards a later batch's smallest kept value
    first = module.threshold[0].item()
    module.loss(3 * x, torch.randn(64, D_MODEL), dead=None)
    later = (
        torch.relu(module.pre_activations(3 * x).detach())
        .flatten()
        .topk(64 * module.cfg.k)
        .values.min()
        .item()
    )
    expected = 0.99 * first + 0.01 * later
    assert module.threshold[0].item() == pytest.approx(expected, rel=1e-5)
    # a batch without a positive pre-activation leaves it where it is
    before = module.threshold.clone()
    selection = module.activation.select(-torch.rand(64, module.cfg.d_transcoder) - 0.1)
    assert torch.equal(module.threshold, before)
    # the selection is grouped by row: row i's entries start at offsets[i]
    counts = torch.bincount(selection.rows, minlength=64)
    assert torch.equal(selection.offsets, counts.cumsum(0) - counts)
    assert bool((selection.rows.diff() >= 0).all()) and selection.rows.numel() == 64 * module.cfg.k


def test_batchtopk_calibration_makes_k_latents_per_row_fire_on_its_rows():
    module = Transcoder(config("batchtopk"))
    randomize(module)
    k = module.cfg.k
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, D_MODEL, generator=gen) for n in (40, 24, 64)]
    with torch.no_grad():
        module.threshold.fill_(0.123)  # a running average's estimate
        module.activation.calibrate_((module.pre_activations(x) for x in chunks), 128)
        # exactly k N of the N rows' pre-activations exceed it, wherever they fall
        pre = torch.cat([module.pre_activations(x) for x in chunks])
        assert int((pre > module.threshold).sum()) == k * 128
        assert module.threshold.eq(module.threshold[0]).all()
        assert float(module.encode(torch.cat(chunks)).gt(0).sum(-1).float().mean()) == k
        # the same rows in chunks of any size give the same threshold (the pool of the
        # largest values is cut lazily, at twice what it must hold)
        exact = module.threshold.clone()
        module.activation.calibrate_([pre], 128)
        assert torch.equal(module.threshold, exact)
        for size in (1, 3, 8):
            module.threshold.fill_(0.123)
            module.activation.calibrate_(pre.split(size), 128)
            assert torch.equal(module.threshold, exact)
        # fewer than k N positive values: the running average is kept
        calibrated = module.threshold.clone()
        module.b_enc.fill_(-100.0)
        module.activation.calibrate_((module.pre_activations(x) for x in chunks), 128)
        assert torch.equal(module.threshold, calibrated)
        module.activation.calibrate_(iter(()), 0)  # no rows: nothing to fit
        assert torch.equal(module.threshold, calibrated)
    assert module.activation.calibrates
    assert not Transcoder(config("topk")).activation.calibrates


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_batchtopk_firing_floor_raises_an_outcompeted_latents_bias_until_it_fires(rate):
    cfg = config("batchtopk")
    module = Transcoder(type(cfg)(**{**cfg.to_dict(), "balance_rate": rate}))
    randomize(module)
    activation = module.activation
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.threshold.zero_()
        module.b_enc.add_(1.0)
        module.W_enc[0] *= 0.01
        module.b_enc[0] = -0.5  # latent 0: negative on every token, never selected
    learned = module.b_enc.detach().clone()
    picked = []
    for _ in range(80):
        chosen = activation.select(module.pre_activations(x).detach())
        assert chosen.columns.numel() == 64 * module.cfg.k  # the budget does not change
        module.after_step_()  # applies the bias change, as the trainer does after a step
        picked.append(int((chosen.columns == 0).sum()))
        # the bias is the learned one plus what the floor added, never less
        torch.testing.assert_close(module.b_enc.detach(), learned + activation.balance)
        assert (activation.balance >= 0).all()
    if rate == 0:
        assert sum(picked) == 0 and (activation.balance == 0).all()
        return
    # the bias rises while latent 0 fires on too few tokens, then it fires on its best ones
    first = next(i for i, n in enumerate(picked) if n)
    assert 10 < first < 60
    # from then on it stays about the floor: fired in at least every other batch
    later = picked[first:]
    assert sum(n > 0 for n in later) >= len(later) // 2
    assert activation.balance[0] > 1.0
    # most latents fire above the floor on their own and keep their learned bias
    assert (activation.balance[1:] == 0).sum() >= D_T // 2
    # inference is JumpReLU at the one threshold, through the raised bias
    acts = module.encode(x).detach()
    pre = module.pre_activations(x).detach()
    assert (acts[:, 0] > 0).any()
    torch.testing.assert_close(acts, pre * (pre > module.threshold[0]))
    # a resampled latent starts afresh: nothing of the old raise is kept to take back
    dead = torch.zeros(D_T, dtype=torch.bool)
    dead[0] = True
    optimizer = torch.optim.Adam(module.parameters())
    resample_transcoder(module, optimizer, x, x, dead, torch.Generator().manual_seed(0))
    assert activation.balance[0] == 0 and activation.fired_ema[0] < 0
    assert (activation.fired_ema[1:] >= 0).all()


def test_firing_floor_follows_the_average_count_not_one_batchs():
    cfg = config("batchtopk")  # 16 latents, k 4: at 64 tokens the mean count is 16
    activation = Transcoder(type(cfg)(**{**cfg.to_dict(), "balance_rate": 0.1})).activation
    activation.threshold.fill_(1.0)
    usual = torch.arange(D_T).repeat_interleave(4)  # every latent selected on 4 tokens
    every = torch.ones_like(usual, dtype=torch.bool)  # and fires (value > 0) on each
    for _ in range(5):
        activation._prepare_balance(usual, every, 64)
        assert not activation.take_bias_change().any()  # 4 >= the floor (0.5)
    # one batch in which latent 0 fires on none: its average stays over the floor
    activation._prepare_balance(usual, usual != 0, 64)
    assert not activation.take_bias_change().any()
    # a latent that stops firing is raised once its average falls under the floor
    raised_after = None
    for step in range(60):
        activation._prepare_balance(usual, usual != 0, 64)
        if activation.take_bias_change()[0] > 0:
            raised_after = step
            break
    assert raised_after is not None and raised_after > 10


def test_cross_layer_firing_floor_raises_its_own_layers_bias():
    cfg = config("batchtopk")
    clt = CrossLayerTranscoder(type(cfg)(**{**cfg.to_dict(), "balance_rate": 0.1}), 2)
    randomize(clt)
    before = clt.b_enc.detach().clone()
    pre = torch.rand(32, D_T) + 1.0
    pre[:, 0] = -1.0  # latent 0 of layer 1 never fires
    clt.activations[1].select(pre)
    clt.after_step_()
    change = clt.b_enc.detach() - before
    assert change[1, 0] > 0 and (change[1, 1:] == 0).all() and (change[0] == 0).all()
    torch.testing.assert_close(change[1], clt.activations[1].balance)


def test_balance_rate_is_validated():
    base = config("batchtopk").to_dict()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match="balance_rate"):
            TranscoderConfig(**{**base, "balance_rate": bad})


def test_jumprelu_threshold_gets_a_gradient_from_both_terms():
    module = Transcoder(config("jumprelu"))
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(D_T, D_MODEL) * 0.05)
        module.b_enc.fill_(module.threshold.mean().item())
    x, y = torch.randn(256, D_MODEL), torch.randn(256, D_MODEL)
    parts = module.loss(x, y, dead=None)
    parts.sparsity.backward(retain_graph=True)
    grad_sparsity = module.threshold.grad.clone()
    assert grad_sparsity.abs().sum() > 0 and (grad_sparsity <= 0).all()
    module.zero_grad()
    parts.mse.backward()
    assert module.threshold.grad.abs().sum() > 0
    acts = module.encode(x).detach()
    assert (acts[acts != 0].abs() > module.threshold.min().item()).all()


def test_relu_penalty_weights_by_decoder_norm():
    module = Transcoder(config("relu"))
    randomize(module)
    x = torch.randn(32, D_MODEL)
    pre = module.pre_activations(x)
    acts = module.activation(pre)
    base = module.activation.penalty(pre, acts, module.decoder_norms())
    doubled = module.activation.penalty(pre, acts, 2 * module.decoder_norms())
    torch.testing.assert_close(doubled, 2 * base)
    assert base > 0


def test_aux_k_loss_gives_dead_latents_a_gradient():
    module = Transcoder(config("topk"))
    randomize(module)
    dead = torch.zeros(D_T, dtype=torch.bool)
    dead[:5] = True
    parts = module.loss(torch.randn(32, D_MODEL), torch.randn(32, D_MODEL), dead)
    assert parts.aux > 0
    parts.aux.backward()
    assert module.W_enc.grad[:5].abs().sum() > 0
    assert module.W_enc.grad[5:].abs().sum() == 0


def test_clt_writes_to_every_later_layer_and_only_those():
    cfg = config("relu", skip=True)
    clt = CrossLayerTranscoder(cfg, 3)
    randomize(clt)
    xs = [torch.randn(5, D_MODEL) for _ in range(3)]
    acts = [clt.encode(s, x) for s, x in enumerate(xs)]
    out = clt(xs)
    for t in range(3):
        expected = clt.b_dec[t] + xs[t] @ clt.W_skip[t].T
        for s in range(t + 1):
            expected = expected + acts[s] @ clt.W_dec[s][:, t - s]
        torch.testing.assert_close(out[t], expected)
    # Changing layer 2's input does not change the estimates of layers 0 and 1.
    xs2 = [xs[0], xs[1], xs[2] + 1.0]
    out2 = clt(xs2)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[1], out2[1])
    assert not torch.equal(out[2], out2[2])


def test_clt_reconstructs_a_cross_layer_target_that_per_layer_cannot():
    torch.manual_seed(0)
    cfg = TranscoderConfig(arch="relu", d_in=4, d_out=4, d_transcoder=16, sparsity=0.0)
    clt = CrossLayerTranscoder(cfg, 2)
    # Layer 1's output depends only on layer 0's input: only a CLT decoder can carry it.
    x0, x1 = torch.randn(256, 4), torch.randn(256, 4)
    y0, y1 = torch.relu(x0), torch.relu(-x0)
    opt = torch.optim.Adam(clt.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        clt.loss([x0, x1], [y0, y1], None).total.backward()
        opt.step()
    with torch.no_grad():
        fvu1 = (clt([x0, x1])[1] - y1).pow(2).sum() / (y1 - y1.mean(0)).pow(2).sum()
    assert fvu1 < 0.1


def test_set_api_per_layer_and_cross_layer():
    per_layer = make_set("transcoder", "relu", layers=[0, 2])
    assert per_layer.targets(2) == [2]
    idx = torch.tensor([1, 3])
    assert torch.equal(per_layer.decoder_vectors(2, idx)[2], per_layer.module(2).W_dec[idx])
    assert per_layer.encoder_vectors(0, idx).shape == (2, D_MODEL)
    out = per_layer.reconstruct([torch.randn(3, D_MODEL), None, torch.randn(3, D_MODEL)])
    assert out[1] is None and out[0].shape == (3, D_MODEL)

    x2 = torch.randn(3, D_MODEL)
    torch.testing.assert_close(
        per_layer.decode(2, per_layer.encode(2, x2)), per_layer.reconstruct([x2, None, x2])[2]
    )

    clt = make_set("clt", "jumprelu", skip=True)
    xs = [torch.randn(3, D_MODEL) for _ in range(3)]
    acts = {layer: clt.encode(layer, xs[layer]) for layer in range(3)}
    torch.testing.assert_close(clt.decode(2, acts, xs[2]), clt.reconstruct(xs)[2])
    vectors = clt.decoder_vectors(1, idx)
    assert sorted(vectors) == [1, 2]
    assert torch.equal(vectors[2], clt.clt.W_dec[1][idx, 1])
    x = torch.randn(3, D_MODEL)
    pre = clt.pre_activations(1, x)
    torch.testing.assert_close(pre, x @ clt.W_enc(1).T + clt.b_enc(1))
    assert torch.equal(clt.encode(1, x), pre * (pre > clt.threshold(1)))


def test_set_layer_errors():
    tset = make_set("transcoder", "relu", layers=[0, 2])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        tset.encode(3, torch.randn(1, D_MODEL))
    with pytest.raises(InvalidArgumentError, match="no transcoder"):
        tset.encode(1, torch.randn(1, D_MODEL))
    with pytest.raises(InvalidArgumentError, match="feature indices"):
        tset.encoder_vectors(0, torch.tensor([D_T]))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        make_set("transcoder", "relu", layers=[0, 5])


def test_check_fits_names_the_mismatch():
    adapter = tiny_adapter()  # a real 2-layer GPT-2 with d_model 8
    make_set("transcoder", "relu", n_layers=2, fingerprint=adapter.fingerprint()).check_fits(
        adapter
    )
    make_set("transcoder", "relu", n_layers=2, fingerprint="").check_fits(adapter)
    with pytest.raises(InvalidArgumentError, match=r"3 layers.*this model has 2 layers"):
        make_set("transcoder", "relu", n_layers=3).check_fits(adapter)
    with pytest.raises(InvalidArgumentError, match="weights differ"):
        make_set("clt", "topk", n_layers=2, fingerprint="0" * 64).check_fits(adapter)


def _offset_low_rank_data(d: int = 16, rank: int = 3, n: int = 4096) -> torch.Tensor:
    """Rows with a large common mean and a low-rank spread, like zoo MLP inputs."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(rank, d, generator=gen)
    return 4 * torch.randn(d, generator=gen) + torch.randn(n, rank, generator=gen) @ basis


def test_topk_encoder_starts_as_the_decoder_transposed():
    module = Transcoder(config("topk", d_t=64))
    assert torch.allclose(module.W_enc, module.W_dec)
    assert torch.allclose(module.W_dec.norm(dim=-1), torch.ones(64))


def test_centring_the_encoder_lets_more_latents_win_topk_at_init():
    x = _offset_low_rank_data()
    module = Transcoder(config("topk", d_t=128, d=16))
    module.reset_parameters(torch.Generator().manual_seed(1))
    before = (module.encode(x) > 0).any(0).float().mean()
    module.init_from_data(x, x)
    after = (module.encode(x) > 0).any(0).float().mean()
    # Uncentred, the latents aligned with the mean win every token's selection.
    assert torch.allclose(module.pre_activations(x.mean(0)), torch.zeros(128), atol=1e-4)
    assert torch.allclose(module.b_dec, x.mean(0))
    assert after > 2 * before


def test_clt_encoders_are_centred_on_their_own_layer_input():
    xs = [_offset_low_rank_data(), 2 + _offset_low_rank_data()]
    clt = CrossLayerTranscoder(config("topk", d_t=32, d=16), 2)
    clt.init_from_data(xs, xs)
    for s, x in enumerate(xs):
        assert torch.allclose(clt.pre_activations(s, x.mean(0)), torch.zeros(32), atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "k"),
    # widths that are not multiples of the chunk size keep their last w % 8 columns apart
    [((256, 512), 16), ((100, 512), 32), ((9, 1024), 16), ((33, 300), 32), ((64, 357), 16),
     ((40, 75), 4)],
)  # fmt: skip
def test_chunked_topk_selects_the_same_values_as_torch_topk(shape, k):
    from ingest.transcoders.architectures import topk_indices

    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    scores[:, :40] *= 4  # large values concentrated in a few chunks
    scores[::3, -3:] += 10  # and, on some rows, in the columns left over
    indices = topk_indices(scores, k)
    assert indices.shape == (shape[0], k)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct columns
    expected = scores.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(scores.gather(1, indices).sort(-1).values, expected)


def _sampled_peaks(n: int) -> torch.Tensor:
    """Values whose largest lie only where the stride-61 sample looks, so that the
    sample's quantile overestimates the threshold and too few values reach it."""
    values = torch.rand(n, generator=torch.Generator().manual_seed(1))
    values[::61] += 100.0
    return values


@pytest.mark.parametrize(
    ("values", "m"),
    [
        (torch.randn(4096 * 64, generator=torch.Generator().manual_seed(0)).relu(), 4096 * 4),
        (torch.randn(300 * 512, generator=torch.Generator().manual_seed(2)), 300 * 16),
        # more than half are exact zeros and m reaches into them: ties at the threshold
        (torch.randn(64 * 64, generator=torch.Generator().manual_seed(3)).relu(), 64 * 40),
        (_sampled_peaks(61 * 1000), 900),  # too few reach the sample's threshold: fallback
        (torch.arange(100.0), 30),  # m over a quarter of n: plain topk
    ],
)
def test_batch_selection_is_exact(values, m):
    from ingest.transcoders.architectures import largest_indices

    indices = largest_indices(values, m)
    assert indices.numel() == m and indices.unique().numel() == m
    expected = values.topk(m).values.sort().values
    assert torch.equal(values[indices].sort().values, expected)


def test_aux_k_loss_on_dead_columns_equals_the_masked_dense_form():
    from ingest.transcoders.losses import aux_k_loss, normalized_mse

    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(128, 64, generator=gen, dtype=torch.float64)
    dead = torch.rand(64, generator=gen) < 0.5
    residual = torch.randn(128, 8, generator=gen, dtype=torch.float64)
    w_dec = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    expected = normalized_mse(acts @ w_dec, residual)
    assert torch.allclose(aux_k_loss(pre, dead, residual, w_dec, 4), expected, rtol=1e-12)


def test_integer_row_weights_equal_repeated_rows():
    """A row of weight w counts as w copies of itself in every loss term."""
    from ingest.transcoders.losses import aux_k_loss, normalized_mse

    gen = torch.Generator().manual_seed(5)
    weight = torch.tensor([1.0, 3.0, 1.0, 2.0, 4.0, 1.0])
    repeats = weight.long()
    y = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    y_hat = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    w64 = weight.double()
    torch.testing.assert_close(
        normalized_mse(y_hat, y, w64),
        normalized_mse(y_hat.repeat_interleave(repeats, 0), y.repeat_interleave(repeats, 0)),
    )
    pre = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    dead = torch.rand(64, generator=gen) < 0.5
    w_dec = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        aux_k_loss(pre, dead, y, w_dec, 4, weight=w64),
        aux_k_loss(pre.repeat_interleave(repeats, 0), dead, y.repeat_interleave(repeats, 0),
                   w_dec, 4),
    )  # fmt: skip
    for arch in ("relu", "jumprelu"):
        module = Transcoder(config(arch))
        randomize(module)
        x = torch.randn(6, D_MODEL, generator=gen)
        ys = torch.randn(6, D_MODEL, generator=gen)
        weighted = module.loss(x, ys, None, weight)
        repeated = module.loss(x.repeat_interleave(repeats, 0), ys.repeat_interleave(repeats, 0),
                               None)  # fmt: skip
        torch.testing.assert_close(weighted.mse, repeated.mse)
        torch.testing.assert_close(weighted.sparsity, repeated.sparsity)
        assert weighted.sparsity > 0


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_set_inputs_of_another_width_or_dtype_are_refused_by_name(kind):
    tset = make_set(kind=kind, skip=True)
    layer, d = tset.layers[0], tset.d_model
    x = torch.randn(3, d)
    for method in (tset.encode, tset.pre_activations, tset.skip):
        assert method(layer, x).shape[0] == 3
        with pytest.raises(InvalidArgumentError, match=rf"shape \(3, {d - 1}\).*\(\.\.\., {d}\)"):
            method(layer, x[:, :-1])
        with pytest.raises(InvalidArgumentError, match=r"torch\.float64 but the set.s weights are"):
            method(layer, x.double())
        with pytest.raises(InvalidArgumentError, match=r"must be a torch\.Tensor"):
            method(layer, x.tolist())
