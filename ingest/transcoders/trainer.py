"""Deterministic, resumable transcoder training.

Algorithm (per step): take a shuffled batch of (input, target) rows for every covered
layer from the :class:`~ingest.transcoders.buffer.ActivationBuffer`; scale inputs and
targets by per-layer constants so that ``E|x|^2 = d_model`` (measured on the first refill,
SAELens/Gemma Scope convention); minimize ``normalized MSE + sparsity penalty + AuxK``
(per-layer modules trained side by side with one Adam optimizer, or one CLT trained
jointly); for architectures with unit-norm decoders, remove the gradient component along
each decoder row before the step and renormalize after it (sparsify). The learning rate
warms up linearly, stays flat, and decays linearly to zero over the last 20% of steps;
dead latents are revived by AuxK and, every ``resample_every`` steps before the decay,
re-initialized on badly reconstructed tokens (:mod:`ingest.transcoders.resampling`);
the ReLU L1 coefficient ramps up over the first 10% of steps (Anthropic 2024 update).
A latent is dead for AuxK when it has not fired for ``dead_after_tokens`` tokens.
With a prompt source scored only at the answer (zoo tasks trained on the answer alone),
the rows at the position that predicts the answer weigh ``answer_weight`` in every loss
term (default 8): that is where such a model's MLPs do the work its CE and task metric
measure, and it is one row in about a dozen.

With ``kl_steps`` > 0 the run then takes that many end-to-end steps
(:mod:`ingest.transcoders.end_to_end`): the same loss on the buffer's next batch plus
``kl_coefficient`` x the KL of the model with every covered MLP replaced, at ``kl_lr``
(decayed over their last 20%), with BatchTopK's threshold calibrated when they begin and
held through them; no resampling.

Every ``checkpoint_every`` steps the full state is written atomically
(:mod:`ingest.transcoders.checkpoint`); ``resume=True`` continues from it, and because the
buffer re-collects its current refill by index, a resumed run ends bit-identical to an
uninterrupted one on the same device. At the end the scales are folded into the weights
and the set is written in the native layout (``circuit-tracer`` + ``circuitscope.json``).
"""

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ingest.devices import retain_freed_cpu_memory
from ingest.errors import FailedPreconditionError, InvalidArgumentError
from ingest.transcoders.buffer import ActivationBuffer, collect, rows_for_budget
from ingest.transcoders.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from ingest.transcoders.config import TrainConfig, TranscoderConfig, flagged
from ingest.transcoders.end_to_end import EndToEndLoss
from ingest.transcoders.formats.circuit_tracer import load_set, save_set
from ingest.transcoders.sources import Source
from ingest.transcoders.trainable import Trainable, compiled_loss, quick_eval
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet

logger = logging.getLogger(__name__)

#: Token rows per layer that set the activation scales and the data-dependent init.
INIT_ROWS = 65_536
#: Training rows per layer (rounded up to whole batches) that BatchTopK's inference
#: threshold is calibrated on after the last step.
CALIBRATION_ROWS = 65_536


@dataclass
class TrainResult:
    tset: TranscoderSet
    out_dir: Path
    steps_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    #: ``tokens_per_second`` counts the training loop and every activation collection
    #: (also the first refill, before the loop); this is the same tokens over the loop's
    #: time less collection (steps, evals and checkpoints).
    step_tokens_per_second: float = 0.0
    peak_memory_bytes: int = 0
    #: The activation buffer: rows held per layer, bytes, and whether the whole split fit
    #: (collected once) or was streamed.
    buffer_rows: int = 0
    buffer_bytes: int = 0
    buffer_resident: bool = False


def _schedule(base: float, step: int, steps: int, warmup: int) -> float:
    """``base`` warmed up linearly over ``warmup`` steps, flat, then decayed linearly to
    zero over the last 20% of ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(steps * 0.8)
    if step >= decay_start:
        return base * max(0.0, (steps - step) / max(1, steps - decay_start))
    return base


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """The reconstruction steps' schedule, then the end-to-end steps' (no warmup)."""
    if step >= cfg.steps:
        return _schedule(cfg.kl_lr, step - cfg.steps, cfg.kl_steps, 0)
    return _schedule(cfg.lr, step, cfg.steps, cfg.warmup_steps)


def _sparsity_ramp(cfg: TrainConfig, step: int) -> float:
    if cfg.arch != "relu":
        return 1.0
    ramp = max(1, cfg.steps // 10)
    return min(1.0, (step + 1) / ramp)


@torch.no_grad()
def _scales(x: torch.Tensor) -> list[float]:
    """x: (n_layers, N, d) -> per layer sqrt(d / E|x|^2)."""
    d = x.shape[-1]
    return [float((d / row.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt()) for row in x]


def build_set(
    trainable: Trainable,
    cfg: TrainConfig,
    module_cfg: TranscoderConfig,
    layers: list[int],
    in_scales: list[float],
    out_scales: list[float],
    adapter: Any,
    model_id: str,
    fingerprint: str,
) -> TranscoderSet:
    """A copy of the trained modules with the scales folded in, as a TranscoderSet."""
    meta = SetMetadata(
        kind=cfg.kind,
        model_id=model_id,
        model_fingerprint=fingerprint,
        n_layers=adapter.n_layers,
        d_model=adapter.d_model,
        layers=layers,
        config=module_cfg,
        extra={"train_config": cfg.run_dict(adapter.d_model)},
    )
    trained = copy.deepcopy(trainable)
    if trained.clt is not None:
        trained.clt.fold_scales_(in_scales, out_scales)
        return TranscoderSet(meta, trained.clt)
    modules: dict[int, Transcoder] = {}
    for i, layer in enumerate(layers):
        module: Transcoder = trained.per_layer[i]  # type: ignore[assignment]
        module.fold_scales_(in_scales[i], out_scales[i])
        modules[layer] = module
    return TranscoderSet(meta, modules)


def _resolved(run: dict[str, Any], d_model: int) -> dict[str, Any]:
    """A checkpoint's run state with its config resolved as :meth:`TrainConfig.run_dict`
    resolves it now (checkpoints of earlier versions kept ``None`` for a default). A
    config with a setting this version does not know is compared as it is (and so
    differs): dropping the setting would resume another run."""
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    if not isinstance(run.get("config"), dict) or set(run["config"]) - known:
        return run
    try:
        config = TrainConfig.from_run_dict(run["config"]).run_dict(d_model)
    except (InvalidArgumentError, TypeError, KeyError):
        return run  # not a config this version reads: compared as it is
    return {**run, "config": config}


def _run_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between a checkpoint's run state and this run's, for the error."""
    saved_cfg, current_cfg = saved.get("config", {}), current["config"]
    parts = [
        f"{flagged(key)}: {saved_cfg.get(key)!r} in the checkpoint, {current_cfg.get(key)!r} now"
        for key in sorted(set(saved_cfg) | set(current_cfg))
        if saved_cfg.get(key) != current_cfg.get(key)
    ]
    # the resolved layers follow from the config and the model, so they need no entry
    if saved.get("model_fingerprint") != current["model_fingerprint"]:
        parts.append("the model's weights differ")
    return "; ".join(parts) or "its run state differs"


def resolve_layers(cfg: TrainConfig, n_layers: int) -> list[int]:
    layers = list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise InvalidArgumentError(
            f"layers {bad or layers} are out of range for a {n_layers}-layer model: "
            f"use 0..{n_layers - 1}"
        )
    return layers


def train_transcoders(
    adapter: Any,
    source: Source,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    model_id: str,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train per ``cfg`` on ``adapter``'s activations over ``source``; write to ``out_dir``.

    ``stop_after`` ends the loop after that many steps without a final checkpoint or
    export, as a killed process would (used to test resumption).
    """
    retain_freed_cpu_memory()  # the step's matrices are reused, not page-faulted anew
    run = _Run(adapter, source, cfg, Path(out_dir))
    if has_checkpoint(run.out):
        if not resume:
            raise FailedPreconditionError(
                f"{run.out} already holds a training checkpoint: pass resume=True "
                "(--resume) to continue it, or choose another output directory (--out)"
            )
        run.restore()
    else:
        run.initialize()
    run.collect_eval()
    end_to_end = run.end_to_end() if cfg.kl_steps else None
    total_steps = cfg.total_steps
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = tqdm(total=total_steps, initial=run.start, disable=not progress, desc="transcoders")
    began = time.perf_counter()
    collect_before = run.buffer.collect_seconds
    trained_tokens = 0
    steps_done = run.start
    try:
        for step in range(run.start, end):
            x, y, weight = run.step(step, end_to_end)
            trained_tokens += cfg.batch_size
            done = step + 1
            bar.update(1)
            if done % cfg.eval_every == 0 or done in (cfg.steps, total_steps):
                run.check_finite(done)
                bar.set_postfix(run.evaluate(done))
            # Resampling comes after the evaluation, so that the evaluation reports the
            # latents as trained and the dead fraction before the counters restart (fresh
            # resamples fire on many tokens until trained: FVU read 1-3 right after one
            # on greater-than).
            if (
                cfg.resample_every
                and done % cfg.resample_every == 0
                and done < int(cfg.steps * 0.8)
            ):
                run.resample(step, x, y, weight)
            if done % cfg.checkpoint_every == 0 or done in (cfg.steps, total_steps):
                run.checkpoint(done)
            steps_done = done
    finally:
        bar.close()
    # End to end counts every activation collection of this run, also the one before the
    # loop (the first refill, or with a resident buffer the whole split); the steps-only
    # rate leaves all of it out.
    loop = time.perf_counter() - began
    elapsed = max(loop + collect_before, 1e-9)
    stepping = max(loop - (run.buffer.collect_seconds - collect_before), 1e-9)
    peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else 0
    if steps_done >= total_steps and run.trainable.calibrates:
        # drawn after the final checkpoint, so a finished run resumed draws the same rows.
        # After end-to-end steps too: they train the encoder at the threshold held since
        # they began, and nothing in them keeps L0 at k there (held, greater-than Llama's
        # transcoder ended at L0 18.3 for k 16); calibrating again restores L0 = k for the
        # comparisons at equal L0, at some of the KL they gained (docs/transcoders.md).
        run.calibrate()
    tset = build_set(
        run.trainable,
        cfg,
        run.module_cfg,
        run.layers,
        run.in_scales,
        run.out_scales,
        adapter,
        model_id,
        run.fingerprint,
    )
    if steps_done >= total_steps:
        run.check_finite(steps_done)
        save_set(tset, run.out)
        # The set as saved, without the training-only state (BatchTopK's firing counts):
        # this set and a later read of the directory are one set, with one weights
        # fingerprint, so attributing with either gives the same graph ids.
        tset = load_set(run.out, device=run.device)
    return TrainResult(
        tset=tset,
        out_dir=run.out,
        steps_done=steps_done,
        history=run.history,
        tokens_per_second=trained_tokens / elapsed,
        step_tokens_per_second=trained_tokens / stepping,
        peak_memory_bytes=int(peak),
        buffer_rows=run.buffer.capacity_rows,
        buffer_bytes=run.buffer.nbytes,
        buffer_resident=run.buffer.resident,
    )


class _Run:
    """One training run: its modules, optimizer, buffer and counters, what a checkpoint
    holds besides, and the parts of the loop (:func:`train_transcoders` drives them)."""

    def __init__(self, adapter: Any, source: Source, cfg: TrainConfig, out: Path) -> None:
        self.adapter, self.source, self.cfg, self.out = adapter, source, cfg, out
        self.device = adapter.device
        self.layers = resolve_layers(cfg, adapter.n_layers)
        self.module_cfg = cfg.module_config(adapter.d_model)
        self.fingerprint = adapter.fingerprint()
        self.trainable = Trainable(self.module_cfg, len(self.layers), cfg.kind == "clt").to(
            self.device
        )
        answer_weight = cfg.answer_weight if source.answer_only else 1.0
        self.buffer = ActivationBuffer(
            adapter,
            source,
            self.layers,
            capacity_rows=cfg.buffer_rows
            or rows_for_budget(
                cfg.buffer_mb,
                len(self.layers),
                adapter.d_model,
                cfg.kind == "sae",
                answer_weight != 1.0,
            ),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            input_site="mlp_out" if cfg.kind == "sae" else "mlp_in",
            model_batch_size=cfg.model_batch_size,
            device=self.device,
            answer_weight=answer_weight,
        )
        # fused: one kernel for the whole update (CPU and CUDA), a third of the time of
        # the multi-tensor (foreach) form on CPU; deterministic, so resumption stays
        # bit-exact.
        self.optimizer = torch.optim.Adam(
            self.trainable.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True
        )
        # --compile: the loss compiled whole (fixed shapes); None: the eager loss
        self.compiled_loss = compiled_loss(self.trainable, self.device) if cfg.compile else None
        # what the end-to-end steps back-propagate to (the modules', not the model's)
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        d_t = self.module_cfg.d_transcoder
        self.since_fired = torch.zeros(len(self.layers), d_t, dtype=torch.long, device=self.device)
        self.history: list[dict[str, Any]] = []
        self.kl_sum, self.kl_count = 0.0, 0  # the end-to-end steps' KL since the last eval
        self.run_state = {
            "config": cfg.run_dict(adapter.d_model),
            "model_fingerprint": self.fingerprint,
            "layers": self.layers,
        }
        self.start = 0
        # per layer sqrt(d / E|x|^2) of inputs and targets, and as (n_layers, 1, 1) tensors
        self.in_scales: list[float] = []
        self.out_scales: list[float] = []
        self.s_in = self.s_out = torch.empty(0)
        self.eval_x = self.eval_y = torch.empty(0)

    # ------------------------------------------------------------------ state
    def restore(self) -> None:
        """Continue from the checkpoint in ``out``, made by the same run."""
        ckpt = load_checkpoint(self.out)
        saved = ckpt.state
        saved_run = _resolved(saved["run"], self.adapter.d_model)
        if saved_run != self.run_state:
            raise FailedPreconditionError(
                f"the checkpoint in {self.out} was made with another configuration or model "
                f"({_run_differences(saved_run, self.run_state)}): resume with the same "
                "flags and model, or choose another --out"
            )
        self.trainable.load_state_dict({k: v.to(self.device) for k, v in ckpt.module.items()})
        restore_optimizer(self.optimizer, ckpt.optimizer)
        self.since_fired.copy_(ckpt.counters["all"].to(self.device))
        torch.set_rng_state(ckpt.rng)
        self._set_scales(saved["in_scales"], saved["out_scales"])
        self.buffer.load_state_dict(saved["buffer"])
        self.start = int(saved["step"])
        self.history = list(saved["history"])
        self.kl_sum, self.kl_count = saved.get("kl_since_eval", (0.0, 0))
        logger.info("resumed from step %d in %s", self.start, self.out)

    def initialize(self) -> None:
        """A fresh run: seeded parameters, then the scales and the data-dependent init
        from a shuffled sample of the first refill (so a resident split of any size
        costs no more than a sample of it here)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.trainable.reset(gen)
        self.trainable.to(self.device)
        x0, y0 = self.buffer.prime(max_rows=INIT_ROWS)
        self._set_scales(_scales(x0), _scales(y0))
        self.trainable.init_from_data(x0 * self.s_in, y0 * self.s_out)
        self.start = 0

    def _set_scales(self, in_scales: list[float], out_scales: list[float]) -> None:
        self.in_scales, self.out_scales = in_scales, out_scales
        self.s_in = torch.tensor(in_scales, device=self.device)[:, None, None]
        self.s_out = torch.tensor(out_scales, device=self.device)[:, None, None]

    def check_finite(self, done: int) -> None:
        """Refuse to go on (and to checkpoint or save) once training has diverged: a
        non-finite weight stays so, and a set of them evaluates to nan everywhere."""
        bad = [name for name, p in self.trainable.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            cfg = self.cfg
            lr = f"--kl-lr (now {cfg.kl_lr:g})" if done > cfg.steps else f"--lr (now {cfg.lr:g})"
            kept = (
                f"{self.out} keeps the checkpoint of an earlier step"
                if has_checkpoint(self.out)
                else "no checkpoint was written"
            )
            raise InvalidArgumentError(
                f"training diverged by step {done}: {len(bad)} weight tensor(s) hold nan or inf "
                f"(e.g. {bad[0]}); train again into a new --out with a lower {lr} ({kept})"
            )

    def checkpoint(self, step: int) -> None:
        self.check_finite(step)
        state = {
            "run": self.run_state,
            "step": step,
            "buffer": self.buffer.state_dict(),
            "in_scales": self.in_scales,
            "out_scales": self.out_scales,
            "history": self.history,
            "kl_since_eval": [self.kl_sum, self.kl_count],
        }
        save_checkpoint(self.out, state, self.trainable, self.optimizer, {"all": self.since_fired})

    # ------------------------------------------------------------------ the loop's parts
    def collect_eval(self) -> None:
        """The fixed eval activations of the periodic evaluation, in the units the
        modules train in."""
        eval_x, eval_y = collect(
            self.adapter,
            self.source,
            self.layers,
            n_windows=self.cfg.eval_windows,
            input_site=self.buffer.input_site,
            model_batch_size=self.cfg.model_batch_size,
        )
        self.eval_x, self.eval_y = eval_x * self.s_in, eval_y * self.s_out

    def end_to_end(self) -> EndToEndLoss:
        return EndToEndLoss(
            self.adapter,
            self.source,
            self.layers,
            self.cfg.kind,
            list(self.trainable.per_layer),
            self.trainable.clt,
            self.in_scales,
            self.out_scales,
            self.cfg.kl_batch,
            self.cfg.seed,
        )

    def calibrate(self) -> None:
        """Fit BatchTopK thresholds on the buffer's next training rows."""
        n_batches = -(-CALIBRATION_ROWS // self.cfg.batch_size)
        batches = (self.buffer.next_batch()[0] * self.s_in for _ in range(n_batches))
        self.trainable.calibrate(batches, n_batches * self.cfg.batch_size)

    def step(
        self, step: int, end_to_end: EndToEndLoss | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns its scaled batch (x, y, row weights)."""
        cfg, trainable = self.cfg, self.trainable
        if step == cfg.steps and trainable.calibrates:
            # the end-to-end steps' KL runs at the threshold: calibrate it first (on rows
            # drawn after the checkpoint of step `steps`, so a resume draws them again),
            # and hold it there
            self.calibrate()
        trainable.hold_thresholds(step >= cfg.steps)
        x, y, weight = self.buffer.next_batch()
        x, y = x * self.s_in, y * self.s_out
        dead = self.since_fired >= cfg.dead_after_tokens
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.compiled_loss is not None and self.device.type == "cuda":
            # a new iteration of the CUDA graphs: the last step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        parts = (self.compiled_loss or trainable.loss)(x, y, dead, weight)
        total = parts.mse + _sparsity_ramp(cfg, step) * parts.sparsity + parts.aux
        if end_to_end is not None and step >= cfg.steps:
            kl = end_to_end(step)
            total = total + cfg.kl_coefficient * kl
            self.kl_sum, self.kl_count = self.kl_sum + float(kl.detach()), self.kl_count + 1
            total.backward(inputs=self.params)  # no gradient for the model's own weights
        else:
            total.backward()
        if self.module_cfg.spec.unit_norm_decoder:
            for module in trainable.modules_list():
                module.remove_parallel_grad_()
        self.optimizer.step()
        for module in trainable.modules_list():
            module.after_step_()
        with torch.no_grad():
            self.since_fired.add_(cfg.batch_size).masked_fill_(parts.fired, 0)
        return x, y, weight

    def evaluate(self, done: int) -> dict[str, str]:
        """Record the periodic evaluation after ``done`` steps; returns what the
        progress bar shows of it."""
        metrics: dict[str, Any] = quick_eval(
            self.trainable, self.eval_x, self.eval_y, self.since_fired, self.cfg
        )
        metrics["step"] = done
        if self.kl_count:  # the mean training KL of the end-to-end steps since the last
            metrics["kl_train"] = self.kl_sum / self.kl_count
            self.kl_sum, self.kl_count = 0.0, 0
        self.history.append(metrics)
        logger.info("step %d: %s", done, metrics)
        # the bar keeps these until the next evaluation: "eval" names the step they are of
        shown = {
            "eval": f"step {done}",
            "fvu": f"{metrics['fvu']:.3f}",
            "l0": f"{metrics['l0']:.1f}",
        }
        if "kl_train" in metrics:
            shown["kl"] = f"{metrics['kl_train']:.2e}"
        return shown

    def resample(
        self, step: int, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None
    ) -> None:
        """Re-initialize the latents dead now on the step's batch (seeded by the step)."""
        dead_now = self.since_fired >= self.cfg.dead_after_tokens
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        n = self.trainable.resample(self.optimizer, x, y, dead_now, gen, weight)
        if n:  # every latent dead now was re-initialized
            self.since_fired.masked_fill_(dead_now, 0)
            for module in self.trainable.modules_list():
                module.after_step_()
            logger.info("step %d: resampled %d dead latents", step + 1, n)
