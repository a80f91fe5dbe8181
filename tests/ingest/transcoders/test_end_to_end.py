"""End-to-end steps: they lower the spliced model's KL, keep the reconstruction, resume
bit-identically wherever a run is killed, and leave runs without them unchanged."""

import pytest
import torch

from ingest.transcoders.checkpoint import load_checkpoint
from ingest.transcoders.end_to_end import EndToEndLoss
from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from tests.ingest.transcoders.helpers import random_prompt_source, tiny_adapter

pytestmark = pytest.mark.slow


def _cfg(**kw):
    base = dict(
        kind="transcoder", arch="batchtopk", width=32, sparsity=2, steps=16, batch_size=256,
        lr=5e-3, warmup_steps=2, buffer_rows=0, model_batch_size=8, seed=3, eval_every=8,
        checkpoint_every=4, eval_windows=8, dead_after_tokens=64, kl_steps=24, kl_lr=2e-2,
        kl_batch=16,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _train(tmp_path, name, cfg, **kw):
    return train_transcoders(
        tiny_adapter(), random_prompt_source(), cfg, tmp_path / name, model_id="tiny",
        progress=False, **kw,
    )  # fmt: skip


def _kl_all(tset):
    report = evaluate_set(tiny_adapter(), tset, random_prompt_source(), split="train")
    return report["all_layers"]["kl"]


@pytest.mark.parametrize("kind", ["transcoder", "sae", "clt"])
def test_end_to_end_steps_lower_the_spliced_models_kl(tmp_path, kind):
    # The same schedule with the KL weighed next to nothing is the control: what the end
    # to end steps change is the KL term, not the extra steps. (On this random model the
    # KL is a twentieth of the reconstruction error, hence the weight 10.)
    trained = _train(tmp_path, "e2e", _cfg(kind=kind, kl_coefficient=10.0))
    control = _train(tmp_path, "control", _cfg(kind=kind, kl_coefficient=1e-9))
    kl, kl_control = _kl_all(trained.tset), _kl_all(control.tset)
    assert kl < 0.9 * kl_control, (kl, kl_control)
    history = trained.history
    assert [h["step"] for h in history if "kl_train" in h] == [24, 32, 40]
    # the reconstruction is kept: the last FVU is no worse than twice the control's
    assert history[-1]["fvu"] < 2 * control.history[-1]["fvu"]


@pytest.mark.parametrize("kl_steps", [24, 0])
def test_the_threshold_is_calibrated_after_the_last_step(tmp_path, kl_steps):
    """BatchTopK's threshold is calibrated after the last step, after end-to-end steps
    too (they hold it where it was calibrated when they began, and L0 drifts from k
    there): the saved one is not the final checkpoint's (written after the last step),
    and the set's L0 on training rows is about k."""
    trained = _train(tmp_path, "run", _cfg(kind="transcoder", kl_steps=kl_steps))
    at_last_step = load_checkpoint(tmp_path / "run").module
    for i, module in enumerate(trained.tset.per_layer.values()):
        held = at_last_step[f"per_layer.{i}.activation.threshold"]
        assert not torch.equal(module.activation.threshold, held)
    report = evaluate_set(tiny_adapter(), trained.tset, random_prompt_source(), split="train")
    assert report["mean"]["l0"] == pytest.approx(2, rel=0.25)


@pytest.mark.parametrize("stop_after", [16, 22])
def test_killed_in_or_before_the_end_to_end_steps_resumes_bit_identically(tmp_path, stop_after):
    # 16: killed at the last reconstruction step (checkpointed there; the calibration that
    # opens the end-to-end steps is drawn after it); 22: killed in them (last checkpoint 20)
    cfg = _cfg(kind="transcoder", balance_rate=0.2)
    full = _train(tmp_path, "full", cfg)
    _train(tmp_path, "killed", cfg, stop_after=stop_after)
    resumed = _train(tmp_path, "killed", cfg, resume=True)
    a, b = full.tset.state_dict(), resumed.tset.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full.history == resumed.history


@pytest.mark.unit
def test_runs_without_end_to_end_steps_keep_their_run_state():
    # a checkpoint written before the end-to-end fields existed compares equal on resume
    plain = TrainConfig().run_dict(64)
    assert not {"kl_steps", "kl_lr", "kl_coefficient", "kl_batch"} & set(plain)
    assert TrainConfig(kl_lr=1.0).run_dict(64) == plain
    assert TrainConfig(kl_steps=5).run_dict(64)["kl_steps"] == 5
    assert TrainConfig(steps=10, kl_steps=5).total_steps == 15


@pytest.mark.unit
def test_end_to_end_windows_depend_on_seed_and_step_only():
    source = random_prompt_source()

    def loss(seed):
        return EndToEndLoss(tiny_adapter(), source, [0], "transcoder", [], None, [1.0], [1.0],
                            8, seed)  # fmt: skip

    assert loss(0).indices(3) == loss(0).indices(3)
    assert loss(0).indices(3) != loss(0).indices(4)
    assert loss(0).indices(3) != loss(1).indices(3)
    assert all(0 <= i < source.n_windows("train") for i in loss(0).indices(3))
