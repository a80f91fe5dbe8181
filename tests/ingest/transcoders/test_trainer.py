"""Training: FVU falls, runs are deterministic, a killed run resumes bit-identically."""

import pytest
import torch

from ingest.errors import FailedPreconditionError, InvalidArgumentError
from ingest.transcoders.buffer import collect
from ingest.transcoders.checkpoint import load_checkpoint
from ingest.transcoders.formats import load_any
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from tests.ingest.transcoders.helpers import (
    random_prompt_source,
    random_stream_source,
    tiny_adapter,
)

pytestmark = pytest.mark.slow


def _cfg(**kw):
    # width 64 with k 4 takes the chunked TopK selection (architectures.topk_indices)
    base = dict(
        kind="transcoder", arch="topk", width=64, sparsity=4, steps=12, batch_size=32,
        lr=5e-3, warmup_steps=2, buffer_rows=256, model_batch_size=8, seed=3,
        eval_every=6, checkpoint_every=4, eval_windows=8, dead_after_tokens=64,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _train(tmp_path, name, cfg, source=None, **kw):
    return train_transcoders(
        tiny_adapter(), source or random_stream_source(), cfg, tmp_path / name,
        model_id="tiny", progress=False, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "arch"),
    [("transcoder", "topk"), ("transcoder", "relu"), ("clt", "jumprelu"), ("clt", "batchtopk")],
)
def test_training_reduces_fvu(tmp_path, kind, arch):
    sparsity = {"topk": 4, "relu": 0.05, "jumprelu": 0.001, "batchtopk": 4}[arch]
    result = _train(tmp_path, "run", _cfg(kind=kind, arch=arch, sparsity=sparsity, steps=40,
                                          eval_every=5))  # fmt: skip
    fvus = [h["fvu"] for h in result.history]
    assert fvus[-1] < 0.8 * fvus[0], fvus
    assert load_any(tmp_path / "run").kind == kind
    # the loop refilled the buffer, and the steps-only rate leaves that time out
    assert result.step_tokens_per_second > result.tokens_per_second > 0


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_a_set_fresh_from_training_and_read_back_have_one_fingerprint(tmp_path, kind):
    # BatchTopK modules carry training-only state (firing counts) that a set file does
    # not hold: it must not make the two sets' graphs two sets of ids.
    result = _train(tmp_path, "run", _cfg(kind=kind, arch="batchtopk"))
    assert result.tset.fingerprint() == load_any(tmp_path / "run").fingerprint()


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_batchtopk_sets_fire_k_latents_per_token_on_their_training_rows(tmp_path, kind):
    # The whole split is resident (buffer_rows 0), so the calibration rows are the split's
    # rows, each seen a whole number of times up to the last partial pass.
    source = random_stream_source()
    cfg = _cfg(kind=kind, arch="batchtopk", buffer_rows=0, steps=20)
    tset = _train(tmp_path, "run", cfg, source).tset
    x, _ = collect(tiny_adapter(), source, tset.layers, n_windows=10_000, split="train")
    for i, layer in enumerate(tset.layers):
        acts = tset.clt.encode(i, x[i]) if kind == "clt" else tset.module(layer).encode(x[i])
        assert float((acts > 0).sum(-1).float().mean()) == pytest.approx(4, rel=0.05)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = _train(tmp_path, "a", _cfg()).tset.state_dict()
    b = _train(tmp_path, "b", _cfg()).tset.state_dict()
    c = _train(tmp_path, "c", _cfg(seed=4)).tset.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("kind", "arch", "buffer_rows", "compiled"),
    # 128 rows: refilled from the model every 4 steps; 0: the default budget holds the
    # whole split, collected once (resident); compiled: the compiled step (--compile),
    # whose AuxK must back-propagate in a fixed order to be deterministic
    [
        ("transcoder", "topk", 128, False),
        ("clt", "jumprelu", 128, False),
        ("transcoder", "topk", 0, False),
        ("transcoder", "batchtopk", 128, False),
        ("transcoder", "batchtopk", 128, True),
    ],
)
def test_killed_and_resumed_run_is_bit_identical(tmp_path, kind, arch, buffer_rows, compiled):
    # BatchTopK with its firing floor: the balance is state a resume must restore
    balance = {"balance_rate": 0.2} if arch == "batchtopk" else {}
    cfg = _cfg(kind=kind, arch=arch, sparsity=0.01 if arch == "jumprelu" else 4, skip=True,
               buffer_rows=buffer_rows, resample_every=3, dead_after_tokens=32,
               compile=compiled, **balance)  # fmt: skip
    full = _train(tmp_path, "full", cfg)
    # Killed after step 10: its last checkpoint is at step 8, and it exported nothing.
    killed = _train(tmp_path, "killed", cfg, stop_after=10)
    assert killed.steps_done == 10
    assert not (tmp_path / "killed" / "config.yaml").exists()
    with pytest.raises(FailedPreconditionError, match="--resume"):
        _train(tmp_path, "killed", cfg)
    resumed = _train(tmp_path, "killed", cfg, resume=True)
    a, b = full.tset.state_dict(), resumed.tset.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the final checkpoints: the whole training state, which the set leaves out
    first, second = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert first.state == second.state
    for part in ("module", "optimizer", "counters"):
        x, y = getattr(first, part), getattr(second, part)
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x), part
    assert torch.equal(first.rng, second.rng)
    if balance:
        assert any(bool(v.any()) for k, v in first.module.items() if k.endswith("balance"))
    assert full.history == resumed.history


def test_answer_weight_applies_to_answer_only_sources_and_resumes_exactly(tmp_path):
    prompts = random_prompt_source()
    cfg = _cfg(buffer_rows=0, resample_every=3, dead_after_tokens=32)
    weighted = _train(tmp_path, "weighted", cfg, prompts)
    even = _train(tmp_path, "even", _cfg(buffer_rows=0, resample_every=3, dead_after_tokens=32,
                                         answer_weight=1.0), prompts)  # fmt: skip
    a, b = weighted.tset.state_dict(), even.tset.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    # a source scored at every token has no answer rows: the weight changes nothing
    text = [_train(tmp_path, f"text{w}", _cfg(answer_weight=w)).tset.state_dict() for w in (1, 4)]
    assert all(torch.equal(text[0][k], text[1][k]) for k in text[0])
    # killed and resumed with row weights: bit-identical
    _train(tmp_path, "killed", cfg, prompts, stop_after=10)
    resumed = _train(tmp_path, "killed", cfg, prompts, resume=True).tset.state_dict()
    assert all(torch.equal(a[k], resumed[k]) for k in a)


def test_evaluation_at_a_resampling_step_reports_the_state_before_it(tmp_path, caplog):
    # dead after one batch of 32 tokens: at step 6 many of the 64 latents are dead, and the
    # resampling that follows the evaluation restarts their counters
    cfg = _cfg(resample_every=6, eval_every=6, dead_after_tokens=32, steps=12)
    with caplog.at_level("INFO", logger="ingest.transcoders.trainer"):
        history = _train(tmp_path, "run", cfg).history
    assert "step 6: resampled" in caplog.text
    assert history[0]["step"] == 6 and history[0]["dead_fraction_train"] > 0


def test_resume_with_other_config_is_refused(tmp_path):
    _train(tmp_path, "run", _cfg(), stop_after=5)
    with pytest.raises(FailedPreconditionError, match="another configuration") as err:
        _train(tmp_path, "run", _cfg(lr=1e-3), resume=True)
    # the error names what differs, and only that
    assert "(lr (--lr): 0.005 in the checkpoint, 0.001 now)" in str(err.value)


def test_width_defaults_to_an_expansion_of_d_model_and_resumes_as_the_same_run(tmp_path):
    """No --width: expansion x d_model latents. A run is the resolved width, so one started
    with an explicit --width resumes under the expansion that gives the same width."""
    assert TrainConfig().width_for(64) == 512 and TrainConfig().width_for(768) == 6144
    assert TrainConfig(expansion=4).width_for(128) == 512
    assert TrainConfig(width=100, expansion=4).width_for(128) == 100
    d = tiny_adapter().d_model
    _train(tmp_path, "run", _cfg(width=4 * d), stop_after=5)
    resumed = _train(tmp_path, "run", _cfg(width=None, expansion=4), resume=True)
    assert resumed.steps_done == 12
    assert all(resumed.tset.module(i).W_enc.shape == (4 * d, d) for i in resumed.tset.layers)
    _train(tmp_path, "other", _cfg(width=4 * d), stop_after=5)
    mismatch = rf"width \(--width\): {4 * d} in the checkpoint"
    with pytest.raises(FailedPreconditionError, match=mismatch):
        _train(tmp_path, "other", _cfg(width=None, expansion=2), resume=True)


def test_a_default_given_explicitly_resumes_as_the_same_run(tmp_path):
    """--sparsity 16 and --balance-rate at batchtopk's defaults are the run started without
    them, also for a checkpoint that recorded the defaults as None (earlier versions)."""
    from ingest.transcoders.checkpoint import load_checkpoint
    from ingest.transcoders.config import DEFAULT_BALANCE_RATE
    from ingest.transcoders.trainer import _resolved

    implicit = _cfg(arch="batchtopk", sparsity=None, width=64)
    _train(tmp_path, "run", implicit, stop_after=4)
    saved = load_checkpoint(tmp_path / "run").state["run"]
    assert saved["config"]["sparsity"] == 16
    assert saved["config"]["balance_rate"] == DEFAULT_BALANCE_RATE
    explicit = _cfg(arch="batchtopk", sparsity=16, balance_rate=DEFAULT_BALANCE_RATE, width=64)
    assert _train(tmp_path, "run", explicit, resume=True).steps_done == 12
    # as earlier versions wrote the run: the defaults as None, read as what they resolve to
    earlier = {**saved, "config": {**saved["config"], "sparsity": None, "balance_rate": None}}
    assert _resolved(earlier, tiny_adapter().d_model) == saved
    # a setting this version does not know is not dropped: that run is another run
    newer = {**saved, "config": {**saved["config"], "future_setting": 7}}
    assert _resolved(newer, tiny_adapter().d_model) == newer
    # what the run is still decides: another k is refused
    _train(tmp_path, "other", implicit, stop_after=4)
    with pytest.raises(FailedPreconditionError, match=r"sparsity \(--sparsity\): 16"):
        _train(tmp_path, "other", _cfg(arch="batchtopk", sparsity=8, width=64), resume=True)


@pytest.mark.unit
@pytest.mark.parametrize("field", ["width", "expansion"])
def test_width_and_expansion_must_be_positive(field):
    with pytest.raises(InvalidArgumentError, match=f"{field}.* must be positive, got 0"):
        _cfg(**{field: 0})


@pytest.mark.unit
def test_an_sae_with_a_skip_connection_is_refused():
    with pytest.raises(InvalidArgumentError, match="copy its input"):
        _cfg(kind="sae", skip=True)


@pytest.mark.parametrize(
    ("kind", "skip", "expected"),
    [("transcoder", None, True), ("clt", None, True), ("sae", None, False),
     ("transcoder", False, False), ("clt", False, False), ("sae", False, False)],
)  # fmt: skip
def test_skip_connection_defaults_on_for_transcoders_and_off_for_saes(kind, skip, expected):
    cfg = _cfg(kind=kind, skip=skip)
    assert cfg.uses_skip is expected
    assert cfg.module_config(16).skip is expected


def test_layer_out_of_range(tmp_path):
    with pytest.raises(InvalidArgumentError, match="out of range"):
        _train(tmp_path, "run", _cfg(layers=(0, 7)))


@pytest.mark.unit
@pytest.mark.parametrize("cross_layer", [False, True])
def test_resampling_revives_dead_latents_and_resets_their_moments(cross_layer):
    from ingest.transcoders.clt import CrossLayerTranscoder
    from ingest.transcoders.resampling import resample_clt, resample_transcoder
    from ingest.transcoders.transcoder import Transcoder
    from tests.ingest.transcoders.helpers import config

    torch.manual_seed(0)
    cfg = config("relu")
    module = CrossLayerTranscoder(cfg, 2) if cross_layer else Transcoder(cfg)
    opt = torch.optim.Adam(module.parameters())
    x = torch.randn(2, 64, cfg.d_in) + 3.0
    y = torch.randn(2, 64, cfg.d_out)
    with torch.no_grad():  # latents 0..5 can never fire on these inputs
        W_enc = module.W_enc[0] if cross_layer else module.W_enc
        b_enc = module.b_enc[0] if cross_layer else module.b_enc
        W_enc[:6] = -1.0
        b_enc[:6] = -5.0
    if cross_layer:
        loss = module.loss(list(x), list(y), None).total
    else:
        loss = module.loss(x[0], y[0], None).total
    loss.backward()
    opt.step()
    encode = (lambda v: module.encode(0, v)) if cross_layer else module.encode
    assert (encode(x[0])[:, :6] == 0).all()
    dead = torch.zeros(2 if cross_layer else 1, cfg.d_transcoder, dtype=torch.bool)
    dead[0, :6] = True
    gen = torch.Generator().manual_seed(0)
    if cross_layer:
        n = resample_clt(module, opt, x, y, dead, gen)
        moments = opt.state[module.W_enc]["exp_avg"][0]
    else:
        n = resample_transcoder(module, opt, x[0], y[0], dead[0], gen)
        moments = opt.state[module.W_enc]["exp_avg"]
    assert n == 6
    assert (moments[:6] == 0).all() and (moments[6:] != 0).any()
    assert (encode(x[0])[:, :6] > 0).any(0).all()


@pytest.mark.unit
def test_resampling_revives_a_layer_whose_latents_are_all_dead():
    """A layer with no live latent is resampled too (its rows' own norms scale the new
    ones), and JumpReLU's resampled thresholds and their moments start afresh: a
    threshold learned on the old encoder row can lie above every pre-activation of
    the new one."""
    from ingest.transcoders.resampling import resample_transcoder
    from ingest.transcoders.transcoder import Transcoder
    from tests.ingest.transcoders.helpers import config

    torch.manual_seed(0)
    cfg = config("jumprelu")
    module = Transcoder(cfg)
    opt = torch.optim.Adam(module.parameters())
    x, y = torch.randn(64, cfg.d_in), torch.randn(64, cfg.d_out)
    module.loss(x, y, None).total.backward()
    opt.step()
    with torch.no_grad():  # no latent can fire: every threshold far above the inputs
        module.activation.threshold.fill_(1e3)
    assert (module.encode(x) == 0).all()
    dead = torch.ones(cfg.d_transcoder, dtype=torch.bool)
    before = module.W_enc.norm(dim=-1).mean()
    n = resample_transcoder(module, opt, x, y, dead, torch.Generator().manual_seed(0))
    assert n == cfg.d_transcoder
    expected = (0.2 * before).expand(cfg.d_transcoder)
    torch.testing.assert_close(module.W_enc.norm(dim=-1), expected)
    assert (module.activation.threshold == cfg.jumprelu_init_threshold).all()
    assert (opt.state[module.activation.threshold]["exp_avg"] == 0).all()
    # each new latent fires on the token it was made from, so some fire on the batch
    assert (module.encode(x) > 0).any(0).sum() > cfg.d_transcoder // 2


@pytest.mark.parametrize(
    ("kind", "arch"),
    # the sparse step (BatchTopK, TopK) and the dense one with its own autograd functions
    [("transcoder", "batchtopk"), ("sae", "topk"), ("transcoder", "jumprelu")],
)
def test_compiled_step_trains_as_the_eager_one(tmp_path, kind, arch):
    """``compile``: the loss compiled whole (fullgraph, so no graph break and no host
    sync) gives the eager trainer's run to float rounding. With aux_k_rows 0 both AuxK
    forms use every row, so they are the same loss; under TopK and BatchTopK latents die
    (dead_after_tokens 32), so AuxK and the firing floor are in the steps compared;
    JumpReLU's custom autograd functions are compiled too. Resampling is off: it draws
    tokens by their error, and a rounding difference can change a draw."""
    balance = {"balance_rate": 0.2} if arch == "batchtopk" else {}
    sparsity = 0.001 if arch == "jumprelu" else 4
    cfg = _cfg(kind=kind, arch=arch, sparsity=sparsity, aux_k_rows=0, dead_after_tokens=32,
               resample_every=0, steps=8, eval_every=2, **balance)  # fmt: skip
    eager = _train(tmp_path, "eager", cfg)
    compiled = _train(tmp_path, "compiled", _cfg(**{**cfg.to_dict(), "compile": True}))
    assert compiled.steps_done == 8
    a, b = eager.tset.state_dict(), compiled.tset.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    for h_eager, h_compiled in zip(eager.history, compiled.history, strict=True):
        assert h_compiled["dead_fraction_train"] == h_eager["dead_fraction_train"]
        assert h_compiled["fvu"] == pytest.approx(h_eager["fvu"], rel=1e-4)
    if arch != "jumprelu":  # latents died, so AuxK was in the steps compared
        assert max(h["dead_fraction_train"] for h in eager.history) > 0


def test_compile_is_refused_for_a_cross_layer_transcoder():
    with pytest.raises(InvalidArgumentError, match="--compile"):
        _cfg(kind="clt", compile=True)


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_periodic_evaluation_leaves_the_training_state_alone(tmp_path, kind):
    """The evaluation runs BatchTopK's training selection on eval rows: it must not move
    the running threshold or the firing floor's counts the next training steps use."""
    from ingest.transcoders.trainer import _Run

    cfg = _cfg(kind=kind, arch="batchtopk", balance_rate=0.2)
    run = _Run(tiny_adapter(), random_stream_source(), cfg, tmp_path / "run")
    run.initialize()
    run.collect_eval()
    for step in range(5):
        run.step(step, None)
    before = {k: v.clone() for k, v in run.trainable.state_dict().items()}
    metrics = run.evaluate(5)
    assert float(metrics["fvu"]) > 0
    after = run.trainable.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == []
    assert any(k.endswith("fired_ema") for k in before)  # the state checked is there
    # and the training steps still move it
    run.step(5, None)
    assert any(not torch.equal(before[k], run.trainable.state_dict()[k]) for k in before
               if k.endswith(("threshold", "fired_ema")))  # fmt: skip


@pytest.mark.unit
def test_checkpoint_restores_each_parameters_optimizer_state_whatever_the_group_order(tmp_path):
    """The optimizer's state is saved as the optimizer numbers its parameters, so an
    optimizer whose groups list them in another order than the module restores each
    moment onto its own parameter."""
    from ingest.transcoders.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint

    def build():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
        weights, biases = [module[1].weight, module[0].weight], [module[1].bias, module[0].bias]
        return module, torch.optim.Adam([{"params": weights}, {"params": biases, "lr": 0.1}])

    module, optimizer = build()
    module(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, {"step": 1}, module, optimizer, {})
    _, restored = build()
    restore_optimizer(restored, load_checkpoint(tmp_path).optimizer)
    by_shape = {tuple(p.shape): s["exp_avg_sq"] for p, s in optimizer.state.items()}
    for param, state in restored.state.items():
        torch.testing.assert_close(state["exp_avg_sq"], by_shape[tuple(param.shape)])
    assert len(restored.state) == 4
