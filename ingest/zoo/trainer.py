"""Training a zoo model: a Hugging Face causal LM on one task, saved as a checkpoint.

The loop, top to bottom (nanoGPT-style):

1. build the task's tokenizer and an HF config from the architecture registry; seed
   torch and create the model (float32, eager attention, no dropout);
2. encode the training split once: prompt ids ``[N, T]`` and candidate answers ``[N, A]``;
3. each step draws a batch of prompts with a seeded generator, draws one answer per
   prompt among its correct answers, appends it, and takes the cross-entropy only at the
   answer position (at every position for tasks with ``loss_on_all_tokens``);
4. AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient
   clipping; every ``eval_every`` steps a held-out subset is evaluated;
5. the model, tokenizer and ``zoo.json`` are written to a staging directory inside
   ``out_dir`` and then moved into place, ``zoo.json`` last: a failed or interrupted
   write leaves the model that was there whole.

Only the training split is ever trained on. On CPU, the same seed gives bit-identical
weights (single process, same thread count).
"""

import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ingest.devices import resolve_device
from ingest.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ingest.paths import check_output
from ingest.processes import pid_alive
from ingest.zoo.architectures import SpecialIds, get_architecture
from ingest.zoo.checkpoint import (
    CHECKPOINT_FILES,
    MANIFEST,
    TrainSpec,
    ZooManifest,
    default_root,
    read_manifest,
    transformers_quiet,
)
from ingest.zoo.evaluation import evaluate, spread_subset, token_ids
from ingest.zoo.task import Task, TaskExample, TrainingConfig
from ingest.zoo.tasks import get_task
from ingest.zoo.tokenizer import build_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1  # torch.manual_seed takes 64-bit seeds


@dataclass
class ZooTrainResult:
    """What :func:`train_zoo_model` produced: where, how well, how long."""

    out_dir: Path
    metrics: dict[str, float]
    train_seconds: float
    n_parameters: int
    spec: TrainSpec
    reused: bool = False
    passed: dict[str, bool] = field(default_factory=dict)


@dataclass
class _TrainData:
    """The training split as tensors: prompts ``[N, T+1]`` (one spare column for the
    answer), prompt lengths ``[N]``, candidate answers ``[N, A]`` (``-1`` pads), counts ``[N]``."""

    prompts: torch.Tensor
    lengths: torch.Tensor
    answers: torch.Tensor
    n_answers: torch.Tensor


def _encode_training(examples: list[TaskExample], tokenizer: PreTrainedTokenizerFast) -> _TrainData:
    ids = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    width = max(len(row) for row in ids) + 1
    prompts = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(ids):
        prompts[i, : len(row)] = torch.tensor(row)
    vocab = tokenizer.get_vocab()
    answer_rows = [token_ids(tokenizer, e.answers, vocab) for e in examples]
    n_answers = torch.tensor([len(a) for a in answer_rows], dtype=torch.long)
    if bool((n_answers == 0).any()):
        raise ValueError("every training example needs at least one answer")
    answers = torch.full((len(ids), int(n_answers.max())), -1, dtype=torch.long)
    for i, row in enumerate(answer_rows):
        answers[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    return _TrainData(prompts, lengths, answers, n_answers)


def _sample_batch(
    data: _TrainData, batch_size: int, all_tokens: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``[B, T]``, next-token targets ``[B, T]`` (``-100`` = no loss) and the
    attention mask ``[B, T]`` (1 on the prompt and its answer, 0 on the padding)."""
    idx = torch.randint(len(data.lengths), (batch_size,), generator=generator)
    pick = (torch.rand(batch_size, generator=generator) * data.n_answers[idx]).long()
    rows = torch.arange(batch_size)
    answer = data.answers[idx, pick]  # (B,)
    lengths = data.lengths[idx]  # (B,) prompt tokens
    width = int(lengths.max()) + 1
    inputs = data.prompts[idx, :width].clone()  # (B, T)
    inputs[rows, lengths] = answer
    targets = torch.full_like(inputs, -100)
    if all_tokens:
        valid = torch.arange(width)[None, :] < lengths[:, None]  # positions followed by a token
        targets[:, :-1] = inputs[:, 1:]
        targets[~valid] = -100
    else:
        targets[rows, lengths - 1] = answer
    attention_mask = (torch.arange(width)[None, :] <= lengths[:, None]).long()
    return inputs, targets, attention_mask


def _optimizer(model: PreTrainedModel, cfg: TrainingConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def resolve_spec(
    task: str | Task,
    arch: str,
    *,
    tiny: bool = False,
    steps: int | None = None,
    seed: int = 0,
    shape_overrides: Mapping[str, int] | None = None,
    training_overrides: Mapping[str, Any] | None = None,
    task_overrides: Mapping[str, Any] | None = None,
) -> tuple[Task, TrainSpec]:
    """The task instance and full :class:`TrainSpec` of a run: defaults (or tiny
    defaults) of the task, then the overrides; unknown override names are errors."""
    task_obj = get_task(task) if isinstance(task, str) else task
    get_architecture(arch)  # fail early on an unknown family
    if not 0 <= seed <= MAX_SEED:
        raise InvalidArgumentError(f"seed must lie in 0..{MAX_SEED} (torch's range), got {seed}")
    if task_overrides:
        try:
            task_obj = type(task_obj)(**{**task_obj.config(), **task_overrides})  # type: ignore[call-arg]
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"bad task parameters {dict(task_overrides)}: {exc}"
            ) from exc
    shape = task_obj.tiny_shape() if tiny else task_obj.default_shape()
    training = task_obj.tiny_training() if tiny else task_obj.default_training()
    try:
        if shape_overrides:
            shape = replace(shape, **shape_overrides)
        overrides = dict(training_overrides or {})
        if steps is not None:
            overrides["steps"] = steps
        if overrides:
            training = replace(training, **overrides)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"bad model or training setting ({exc}): see ModelShape and TrainingConfig fields"
        ) from exc
    spec = TrainSpec(task_obj.name, task_obj.config(), arch, shape, training, seed)
    return task_obj, spec


def default_out_dir(task: str, arch: str, tiny: bool = False) -> Path:
    """``home()/zoo/{task}-{arch}`` (``-tiny`` appended for tiny models)."""
    return default_root() / f"{task}-{arch}{'-tiny' if tiny else ''}"


def train_zoo_model(
    task: str | Task,
    arch: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = "cpu",
    out_dir: str | Path | None = None,
    tiny: bool = False,
    shape_overrides: Mapping[str, int] | None = None,
    training_overrides: Mapping[str, Any] | None = None,
    task_overrides: Mapping[str, Any] | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ZooTrainResult:
    """Train ``task`` on architecture ``arch`` and save it as an HF checkpoint in ``out_dir``.

    ``tiny=True`` uses the task's tiny shape and schedule (a few seconds on a CPU; for
    tests of code that needs a real trained checkpoint). With ``reuse=True`` an existing
    checkpoint in ``out_dir`` with the same :class:`TrainSpec` is returned untouched,
    and one trained otherwise is replaced. Without ``reuse``, a zoo model already in
    ``out_dir`` is replaced only with ``overwrite``; a non-empty ``out_dir`` that holds
    no zoo model is always refused (before any training).
    Returns the held-out metrics (whole held-out split) and where the model went.
    """
    task_obj, spec = resolve_spec(
        task,
        arch,
        tiny=tiny,
        steps=steps,
        seed=seed,
        shape_overrides=shape_overrides,
        training_overrides=training_overrides,
        task_overrides=task_overrides,
    )
    target = resolve_device(device)
    out = Path(out_dir) if out_dir is not None else default_out_dir(task_obj.name, arch, tiny)
    if reuse:
        existing = _reusable(out, spec)
        if existing is not None:
            return existing
    check_output(out, "--out", directory=True)
    _check_replaceable(out, overwrite=overwrite or reuse)

    cfg = spec.training
    tokenizer = build_tokenizer(task_obj)
    ids = SpecialIds(tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    hf_config = get_architecture(arch).config(spec.shape, len(tokenizer), ids)
    for key, value in task_obj.hf_config_overrides(arch).items():
        setattr(hf_config, key, value)
    train_examples = task_obj.examples("train")
    heldout = task_obj.examples("heldout")
    data = _encode_training(train_examples, tokenizer)
    if data.prompts.shape[1] > spec.shape.n_ctx:
        raise InvalidArgumentError(
            f"{task_obj.name} sequences have {data.prompts.shape[1]} tokens but n_ctx is "
            f"{spec.shape.n_ctx}: raise n_ctx"
        )

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32
    )
    model = model.to(device=target).train()
    optimizer = _optimizer(model, cfg)
    generator = torch.Generator().manual_seed(spec.seed)
    eval_examples = spread_subset(heldout, cfg.eval_examples)
    history: list[dict[str, float]] = []
    n_parameters = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s on %s: %d parameters, %d steps", task_obj.name, arch, n_parameters, cfg.steps
    )

    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"{task_obj.name}/{arch}", disable=not progress, leave=False)
    for step in bar:
        inputs, targets, mask = (
            t.to(target)
            for t in _sample_batch(data, cfg.batch_size, task_obj.loss_on_all_tokens, generator)
        )
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        logits = model(input_ids=inputs, attention_mask=mask).logits  # (B, T, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = evaluate(model, tokenizer, task_obj, eval_examples, device=target)
            history.append({"step": step + 1, "loss": float(loss.detach()), **metrics})
            bar.set_postfix({k: round(v, 3) for k, v in metrics.items()})
            log.info("step %d loss %.4f %s", step + 1, float(loss.detach()), metrics)
    train_seconds = time.perf_counter() - started
    bar.close()

    metrics = evaluate(model, tokenizer, task_obj, heldout, device=target)
    manifest = ZooManifest(
        spec=spec,
        metrics=metrics,
        train_seconds=round(train_seconds, 3),
        n_parameters=n_parameters,
        device=str(target),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        model_config=hf_config.to_dict(),
        history=history,
    )
    _save(out, model, tokenizer, manifest, overwrite=overwrite or reuse)
    passed = {bar_.describe(): bar_.passes(metrics) for bar_ in task_obj.quality_bars()}
    return ZooTrainResult(out, metrics, train_seconds, n_parameters, spec, False, passed)


#: files a zoo checkpoint directory may hold without its manifest: what a save
#: interrupted before ``zoo.json`` leaves (replaceable like a finished model)
_CHECKPOINT_NAMES = {*CHECKPOINT_FILES, "generation_config.json", MANIFEST}
#: the prefix of a save's staging directory inside ``out``
_STAGING = ".saving-"


def _check_replaceable(out: Path, *, overwrite: bool) -> None:
    """Refuse to write over what ``out`` holds: a zoo model (or an interrupted save's
    files) unless ``overwrite``, and never files that are not a checkpoint's."""
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir() if not p.name.startswith(_STAGING)}
    if not names:
        return
    foreign = sorted(names - _CHECKPOINT_NAMES)
    if foreign:
        raise FailedPreconditionError(
            f"--out {out} holds files that are not a zoo model's ({', '.join(foreign[:3])}): "
            "choose a new or empty directory"
        )
    if not overwrite:
        raise AlreadyExistsError(
            f"--out {out} already holds a zoo model: pass --overwrite (overwrite=True) to "
            "replace it, or choose another --out"
        )


def _save(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    manifest: ZooManifest,
    *,
    overwrite: bool,
) -> None:
    """Write the checkpoint into a staging directory inside ``out``, then move its files
    into place, ``zoo.json`` last. A failed or interrupted write leaves the model that was
    there whole; ``out`` itself is never renamed, so it may be the working directory, a
    mount point or a symbolic link."""
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=out))
    moving = False
    try:
        with transformers_quiet():  # no "Writing model shards" bar after training's own
            model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        manifest.write(staging)
        names = [*sorted(p.name for p in staging.iterdir() if p.name != MANIFEST), MANIFEST]
        for name in names:
            (staging / name).chmod(0o644)  # transformers writes the weights 0600
            if (out / name).is_dir() and not (out / name).is_symlink():
                raise IsADirectoryError(f"{out / name} is a directory")
        # Another trainer may have saved here since training began.
        _check_replaceable(out, overwrite=overwrite)
        moving = True
        (out / MANIFEST).unlink(missing_ok=True)  # no zoo model here until the last move
        for name in names:
            os.replace(staging / name, out / name)
    except FailedPreconditionError:
        raise  # another trainer saved here meanwhile: said as such
    except Exception as exc:  # OSError, or the tokenizers/safetensors writers' own errors
        state = (
            "it holds a partial save: train again"
            if moving
            else "the model that was there, if any, is unchanged"
        )
        message = f"could not save the model to {out} ({exc}); {state}"
        raise FailedPreconditionError(message) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging directories of saves whose process is gone (killed mid-save)."""
    for staging in out.glob(f"{_STAGING}*"):
        pid = staging.name.removeprefix(_STAGING).split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _reusable(out: Path, spec: TrainSpec) -> ZooTrainResult | None:
    """The checkpoint in ``out`` if it was trained with exactly ``spec`` and has all its files."""
    if not (out / MANIFEST).is_file():
        return None
    missing = [name for name in CHECKPOINT_FILES if not (out / name).is_file()]
    if missing:
        log.warning("not reusing %s: %s missing, retraining", out, ", ".join(missing))
        return None
    try:
        manifest = read_manifest(out)
    except (InvalidArgumentError, NotFoundError) as exc:
        log.warning("not reusing %s: %s", out, exc)
        return None
    if manifest.spec.to_json() != spec.to_json():
        log.info("not reusing %s: it was trained with another configuration", out)
        return None
    passed = {b.describe(): b.passes(manifest.metrics) for b in get_task(spec.task).quality_bars()}
    return ZooTrainResult(
        out, manifest.metrics, manifest.train_seconds, manifest.n_parameters, spec, True, passed
    )
