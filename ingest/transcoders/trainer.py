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
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
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
from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import TrainConfig, TranscoderConfig, flagged
from ingest.transcoders.end_to_end import EndToEndLoss
from ingest.transcoders.formats.circuit_tracer import save_set
from ingest.transcoders.losses import LossParts
from ingest.transcoders.resampling import resample_clt, resample_transcoder
from ingest.transcoders.sources import Source
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


class _Trainable(nn.Module):
    """The modules being trained: per-layer transcoders/SAEs, or one CLT."""

    def __init__(self, cfg: TranscoderConfig, n_layers: int, cross_layer: bool) -> None:
        super().__init__()
        self.clt = CrossLayerTranscoder(cfg, n_layers) if cross_layer else None
        self.per_layer = nn.ModuleList(
            [] if cross_layer else [Transcoder(cfg) for _ in range(n_layers)]
        )

    def reset(self, generator: torch.Generator) -> None:
        if self.clt is not None:
            self.clt.reset_parameters(generator)
        for module in self.per_layer:
            module.reset_parameters(generator)  # type: ignore[operator]

    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.clt is not None:
            self.clt.init_from_data(list(x), list(y))
        for i, module in enumerate(self.per_layer):
            module.init_from_data(x[i], y[i])  # type: ignore[operator]

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> LossParts:
        """x, y: (n_layers, B, d); dead: (n_layers, d_t) bool or None; weight: (B,) or None."""
        if self.clt is not None:
            return self.clt.loss(list(x), list(y), None if dead is None else list(dead), weight)
        parts = [
            m.loss(x[i], y[i], None if dead is None else dead[i], weight)  # type: ignore[operator]
            for i, m in enumerate(self.per_layer)
        ]
        return LossParts(
            mse=torch.stack([p.mse for p in parts]).sum(),
            sparsity=torch.stack([p.sparsity for p in parts]).sum(),
            aux=torch.stack([p.aux for p in parts]).sum(),
            fired=torch.stack([p.fired for p in parts]),
            l0=torch.stack([p.l0 for p in parts]).mean(),
        )

    def _encoders(self) -> list[tuple[Any, Any]]:
        """Per covered layer: its activation and the function from that layer's (B, d)
        inputs to pre-activations."""
        if self.clt is not None:
            clt = self.clt
            return [
                (activation, lambda x, s=s: clt.pre_activations(s, x))
                for s, activation in enumerate(clt.activations)
            ]
        return [(m.activation, m.pre_activations) for m in self.per_layer]

    @property
    def calibrates(self) -> bool:
        return any(activation.calibrates for activation, _ in self._encoders())

    def hold_thresholds(self, held: bool) -> None:
        """Whether BatchTopK thresholds stay where they are (the end-to-end steps)."""
        for activation, _ in self._encoders():
            activation.tracks_threshold = not held

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], rows: int) -> None:
        """batches: scaled (n_layers, B, d) inputs of ``rows`` training rows in all; each
        activation that calibrates (BatchTopK's threshold) is fitted to them. One pass:
        a batch is folded into each layer's pool and dropped, so only the pools (not
        the rows of every layer) are held."""
        fitted = [(i, a, pre) for i, (a, pre) in enumerate(self._encoders()) if a.calibrates]
        pools: list[torch.Tensor | None] = [None] * len(fitted)
        for x in batches:
            for j, (i, activation, pre_activations) in enumerate(fitted):
                pools[j] = activation.calibration_pool(pools[j], pre_activations(x[i]), rows)
        for (_, activation, _), pool in zip(fitted, pools, strict=True):
            activation.calibrate_([] if pool is None else [pool], rows)

    def modules_list(self) -> list[Any]:
        return [self.clt] if self.clt is not None else list(self.per_layer)

    def resample(
        self,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor,
        gen: torch.Generator,
        weight: torch.Tensor | None = None,
    ) -> int:
        """x, y: (n_layers, B, d) scaled batch; dead: (n_layers, d_t) bool; weight: (B,)."""
        if self.clt is not None:
            return resample_clt(self.clt, optimizer, x, y, dead, gen, weight)
        total = 0
        for i, module in enumerate(self.per_layer):
            assert isinstance(module, Transcoder)
            total += resample_transcoder(module, optimizer, x[i], y[i], dead[i], gen, weight)
        return total


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
    trainable: _Trainable,
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
            f"layers {bad or layers} are out of range for a model with {n_layers} layers: "
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
    out = Path(out_dir)
    device = adapter.device
    retain_freed_cpu_memory()  # the step's matrices are reused, not page-faulted anew
    layers = resolve_layers(cfg, adapter.n_layers)
    module_cfg = cfg.module_config(adapter.d_model)
    fingerprint = adapter.fingerprint()
    trainable = _Trainable(module_cfg, len(layers), cfg.kind == "clt").to(device)
    answer_weight = cfg.answer_weight if source.answer_only else 1.0
    buffer = ActivationBuffer(
        adapter,
        source,
        layers,
        capacity_rows=cfg.buffer_rows
        or rows_for_budget(
            cfg.buffer_mb, len(layers), adapter.d_model, cfg.kind == "sae", answer_weight != 1.0
        ),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        input_site="mlp_out" if cfg.kind == "sae" else "mlp_in",
        model_batch_size=cfg.model_batch_size,
        device=device,
        answer_weight=answer_weight,
    )
    # fused: one kernel for the whole update (CPU and CUDA), a third of the time of the
    # multi-tensor (foreach) form on CPU; deterministic, so resumption stays bit-exact.
    optimizer = torch.optim.Adam(trainable.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    d_t = module_cfg.d_transcoder
    since_fired = torch.zeros(len(layers), d_t, dtype=torch.long, device=device)
    history: list[dict[str, Any]] = []
    kl_sum, kl_count = 0.0, 0  # the end-to-end steps' KL since the last evaluation
    run_state = {
        "config": cfg.run_dict(adapter.d_model),
        "model_fingerprint": fingerprint,
        "layers": layers,
    }

    if has_checkpoint(out):
        if not resume:
            raise FailedPreconditionError(
                f"{out} already holds a training checkpoint: pass --resume to continue it, "
                f"or choose another --out"
            )
        ckpt = load_checkpoint(out)
        saved = ckpt.state
        if saved["run"] != run_state:
            raise FailedPreconditionError(
                f"the checkpoint in {out} was made with another configuration or model "
                f"({_run_differences(saved['run'], run_state)}): resume with the same flags "
                f"and model, or choose another --out"
            )
        trainable.load_state_dict({k: v.to(device) for k, v in ckpt.module.items()})
        restore_optimizer(optimizer, ckpt.optimizer)
        since_fired.copy_(ckpt.counters["all"].to(device))
        torch.set_rng_state(ckpt.rng)
        in_scales, out_scales = saved["in_scales"], saved["out_scales"]
        buffer.load_state_dict(saved["buffer"])
        start = int(saved["step"])
        history = list(saved["history"])
        kl_sum, kl_count = saved.get("kl_since_eval", (0.0, 0))
        logger.info("resumed from step %d in %s", start, out)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        trainable.reset(gen)
        trainable.to(device)
        # scales and data-dependent init from a shuffled sample of the first refill, so a
        # resident split of any size costs no more than a sample of it here
        x0, y0 = buffer.prime(max_rows=INIT_ROWS)
        in_scales, out_scales = _scales(x0), _scales(y0)
        s_in = torch.tensor(in_scales, device=device)[:, None, None]
        s_out = torch.tensor(out_scales, device=device)[:, None, None]
        trainable.init_from_data(x0 * s_in, y0 * s_out)
        start = 0
    s_in = torch.tensor(in_scales, device=device)[:, None, None]
    s_out = torch.tensor(out_scales, device=device)[:, None, None]

    eval_x, eval_y = collect(
        adapter,
        source,
        layers,
        n_windows=cfg.eval_windows,
        input_site=buffer.input_site,
        model_batch_size=cfg.model_batch_size,
    )
    eval_x, eval_y = eval_x * s_in, eval_y * s_out  # the units the modules train in

    def checkpoint(step: int) -> None:
        state = {
            "run": run_state,
            "step": step,
            "buffer": buffer.state_dict(),
            "in_scales": in_scales,
            "out_scales": out_scales,
            "history": history,
            "kl_since_eval": [kl_sum, kl_count],
        }
        save_checkpoint(out, state, trainable, optimizer, {"all": since_fired})

    def calibrate() -> None:
        n_batches = -(-CALIBRATION_ROWS // cfg.batch_size)
        batches = (buffer.next_batch()[0] * s_in for _ in range(n_batches))
        trainable.calibrate(batches, n_batches * cfg.batch_size)

    end_to_end = (
        EndToEndLoss(
            adapter,
            source,
            layers,
            cfg.kind,
            list(trainable.per_layer),
            trainable.clt,
            in_scales,
            out_scales,
            cfg.kl_batch,
            cfg.seed,
        )
        if cfg.kl_steps
        else None
    )
    params = [p for p in trainable.parameters() if p.requires_grad]
    total_steps = cfg.total_steps
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, initial=start, disable=not progress, desc="transcoders")
    began = time.perf_counter()
    collect_before = buffer.collect_seconds
    trained_tokens = 0
    step = start
    try:
        for step in range(start, end):
            if step == cfg.steps and trainable.calibrates:
                # the end-to-end steps' KL runs at the threshold: calibrate it first (on
                # rows drawn after the checkpoint of step `steps`, so a resume draws them
                # again), and hold it there
                calibrate()
            trainable.hold_thresholds(step >= cfg.steps)
            x, y, weight = buffer.next_batch()
            x, y = x * s_in, y * s_out
            dead = since_fired >= cfg.dead_after_tokens
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            parts = trainable.loss(x, y, dead, weight)
            total = parts.mse + _sparsity_ramp(cfg, step) * parts.sparsity + parts.aux
            if end_to_end is not None and step >= cfg.steps:
                kl = end_to_end(step)
                total = total + cfg.kl_coefficient * kl
                kl_sum, kl_count = kl_sum + float(kl.detach()), kl_count + 1
                total.backward(inputs=params)  # no gradient for the model's own weights
            else:
                total.backward()
            if module_cfg.spec.unit_norm_decoder:
                for module in trainable.modules_list():
                    module.remove_parallel_grad_()
            optimizer.step()
            for module in trainable.modules_list():
                module.after_step_()
            with torch.no_grad():
                since_fired.add_(cfg.batch_size).masked_fill_(parts.fired, 0)
            trained_tokens += cfg.batch_size
            done = step + 1
            bar.update(1)
            if done % cfg.eval_every == 0 or done in (cfg.steps, total_steps):
                metrics = _quick_eval(trainable, eval_x, eval_y, since_fired, cfg)
                metrics["step"] = done
                if kl_count:  # the mean training KL of the end-to-end steps since the last
                    metrics["kl_train"] = kl_sum / kl_count
                    kl_sum, kl_count = 0.0, 0
                history.append(metrics)
                shown = {"fvu": f"{metrics['fvu']:.3f}", "l0": f"{metrics['l0']:.1f}"}
                if "kl_train" in metrics:
                    shown["kl"] = f"{metrics['kl_train']:.2e}"
                bar.set_postfix(shown)
                logger.info("step %d: %s", done, metrics)
            # Resampling comes after the evaluation, so that the evaluation reports the
            # latents as trained and the dead fraction before the counters restart (fresh
            # resamples fire on many tokens until trained: FVU read 1-3 right after one
            # on greater-than).
            if (
                cfg.resample_every
                and done % cfg.resample_every == 0
                and done < int(cfg.steps * 0.8)
            ):
                dead_now = since_fired >= cfg.dead_after_tokens
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                n = trainable.resample(optimizer, x, y, dead_now, gen, weight)
                if n:
                    since_fired.masked_fill_(dead_now, 0)
                    for module in trainable.modules_list():
                        module.after_step_()
                    logger.info("step %d: resampled %d dead latents", done, n)
            if done % cfg.checkpoint_every == 0 or done in (cfg.steps, total_steps):
                checkpoint(done)
            step = done
    finally:
        bar.close()
    # End to end counts every activation collection of this run, also the one before the
    # loop (the first refill, or with a resident buffer the whole split); the steps-only
    # rate leaves all of it out.
    loop = time.perf_counter() - began
    elapsed = max(loop + collect_before, 1e-9)
    stepping = max(loop - (buffer.collect_seconds - collect_before), 1e-9)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    if step >= total_steps and trainable.calibrates:
        # drawn after the final checkpoint, so a finished run resumed draws the same rows
        calibrate()
    tset = build_set(
        trainable, cfg, module_cfg, layers, in_scales, out_scales, adapter, model_id, fingerprint
    )
    if step >= total_steps:
        save_set(tset, out)
    return TrainResult(
        tset=tset,
        out_dir=out,
        steps_done=step,
        history=history,
        tokens_per_second=trained_tokens / elapsed,
        step_tokens_per_second=trained_tokens / stepping,
        peak_memory_bytes=int(peak),
        buffer_rows=buffer.capacity_rows,
        buffer_bytes=buffer.nbytes,
        buffer_resident=buffer.resident,
    )


@torch.no_grad()
def _quick_eval(
    trainable: _Trainable,
    x: torch.Tensor,
    y: torch.Tensor,
    since_fired: torch.Tensor,
    cfg: TrainConfig,
) -> dict[str, float]:
    """FVU, L0 and dead fraction on the fixed eval activations (scaled units)."""
    parts = trainable.loss(x, y, None)
    n_layers = x.shape[0]
    never_fired = parts.fired.logical_not().float().mean()
    return {
        "fvu": float(parts.mse) / n_layers,
        "l0": float(parts.l0),
        "dead_fraction_eval": float(never_fired),
        "dead_fraction_train": float((since_fired >= cfg.dead_after_tokens).float().mean()),
    }
