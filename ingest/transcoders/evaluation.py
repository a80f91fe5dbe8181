"""Evaluation of a transcoder set against its model (DESIGN 5.1 metrics).

On the eval split of a prompt source, at real (unpadded) token positions:

- ``l0``: mean number of active latents per token, per layer;
- ``fvu``: ``sum |y - y_hat|^2 / sum |y - mean(y)|^2`` per layer (clean inputs), and
  ``fvu_predicting`` the same over the positions whose next-token prediction the CE
  metrics score (the last prompt token on answer-only zoo tasks), where an MLP's error
  reaches the answer directly;
- ``dead_fraction``: latents that never fire on a large sample of the eval split (at
  least ``dead_tokens`` tokens, default 65,536, or the whole split when it is smaller),
  counted apart from the other metrics, which need far fewer tokens: a latent that fires
  once in 10^4-10^5 tokens looks dead on a few hundred (SAELens and sparsify likewise
  count dead latents over millions of training tokens);
- CE loss recovered ``(CE_ablate - CE_splice) / (CE_ablate - CE_clean)`` and delta loss
  ``CE_splice - CE_clean``, with each layer's MLP output replaced by the set's estimate
  (splice) or by zero (ablate), for each layer alone and for all covered layers together;
  splicing alone uses clean upstream activations, splicing all feeds each estimate the
  spliced model's own activations (for SAEs, the true MLP's output on them);
  ``ce_loss_recovered_95`` is its 95% bootstrap interval over the eval windows (prompts):
  where zero-ablation barely moves the loss, CE recovered is a ratio of small differences
  and the interval shows how little the figure settles;
- ``kl``: mean KL(clean || spliced) of the next-token distributions;
- ``top1_agreement``: the fraction of those predictions whose most likely token is the
  clean model's. On a confident model a few flipped answers carry most of the KL, and
  this counts them;
- for zoo models (``zoo.json`` in the model directory): the task metric with every
  covered MLP replaced, next to the clean model's.

Cross-entropy and KL count the next-token predictions the model was trained to make
(``Windows.scored``): every real token of a text window, only the answer of a zoo task
trained on its answer alone (the report's ``ce_positions``). A model trained on the
answer alone predicts the prompt's own tokens arbitrarily, and zero-ablating one of its
MLPs can lower that loss, which made CE loss recovered over all tokens meaningless there.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ingest.transcoders.buffer import FLOATS_PER_FORWARD, check_window_fits, record_sites
from ingest.transcoders.sources import Source, Split, predicting_positions
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)

Replacements = dict[int, Callable[[torch.Tensor], torch.Tensor]]

#: Eval windows when the caller names none: 64 text windows, or up to 4,096 prompts of a
#: source that scores only each prompt's answer: the whole held-out split of greater-than
#: (2,716) and IOI (3,480), 4,096 of modular addition's 6,384. A layer whose ablation
#: barely moves the answer's loss makes CE recovered a ratio of small differences: IOI's
#: layer 1 (ablation +1.3e-3 nats) read 0.69 on 1,024 prompts and 0.46 on all 3,480.
DEFAULT_WINDOWS = 64
DEFAULT_ANSWER_PROMPTS = 4096

#: The per-layer metrics the report also averages over layers (``report["mean"]``).
MEAN_METRICS = (
    "l0", "fvu", "dead_fraction", "ce_loss_recovered", "delta_loss", "kl", "top1_agreement",
)  # fmt: skip


def default_windows(source: Source) -> int:
    return DEFAULT_ANSWER_PROMPTS if source.answer_only else DEFAULT_WINDOWS


def counted_positions(mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """mask, scored: (B, T) -> keep (B, T - 1): positions t whose next token is real and
    scored, the next-token predictions the CE and KL metrics count."""
    return predicting_positions(mask, scored)[:, :-1]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), ids (B, T), keep (B, T - 1) -> summed CE over kept positions
    (:func:`window_ce` summed)."""
    return window_ce(logits, ids, keep).sum()


def window_ce(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), ids (B, T), keep (B, T - 1) -> (B,) float64: each window's CE
    summed over its kept positions.

    The log-softmax runs in float64 over the kept positions only. In float32 a confident
    prediction's loss is ``logsumexp - x_answer`` with both terms near the largest logit,
    so it is resolved to about 1e-6 nats per prediction: 5% of a loss of 1e-5 nats (the
    test), where the IOI model's answer loss is 1.2e-5 nats and a spliced layer moves it
    by 1e-7. Over IOI's 1,024 answers the errors largely cancelled (its figures moved by
    at most 0.0002), but nothing guaranteed it. In float64 the error is the logits' own
    float32 rounding, far below that.
    """
    logp = F.log_softmax(logits[:, :-1][keep].double(), -1)  # (n, V)
    nll = -logp.gather(-1, ids[:, 1:][keep][:, None]).squeeze(1)
    windows = keep.nonzero()[:, 0]
    return nll.new_zeros(keep.shape[0]).index_add_(0, windows, nll)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row of log-probabilities (..., V) -> (...).

    ``0 log 0 = 0``: a token p gives no probability (a model may put -inf in its logits,
    e.g. for vocabulary padding) adds nothing, where ``p (log p - log q)`` alone is nan;
    a token q gives none and p some makes the row infinite, as it should."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == float("-inf"), 0.0, terms).sum(-1)


def kl_divergence(clean: torch.Tensor, other: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed KL(clean || other) over kept positions; logits (B, T, V), keep (B, T - 1).
    In float64, as :func:`next_token_ce`."""
    p = F.log_softmax(clean[:, :-1][keep].double(), -1)
    q = F.log_softmax(other[:, :-1][keep].double(), -1)
    return kl_rows(p, q).sum()


def top1_matches(clean: torch.Tensor, other: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """How many kept positions' most likely next token is the same under both logits."""
    return (clean[:, :-1][keep].argmax(-1) == other[:, :-1][keep].argmax(-1)).sum()


def all_layer_replacements(adapter: Any, tset: TranscoderSet) -> Replacements:
    """Replacements that run every covered MLP through the set on the live activations."""
    per_layer = [] if tset.clt is not None else [tset.module(layer) for layer in tset.layers]
    return module_replacements(adapter, tset.kind, tset.layers, per_layer, tset.clt)


def module_replacements(
    adapter: Any,
    kind: str,
    layers: list[int],
    per_layer: list[Any],
    clt: Any,
    in_scales: list[float] | None = None,
    out_scales: list[float] | None = None,
) -> Replacements:
    """Every covered MLP (``layers``) run through ``per_layer`` modules (by position) or one
    ``clt``, on the live activations; an SAE reads the true MLP's output on them. Modules
    that act on scaled activations (the trainer's units) take ``in_scales`` and
    ``out_scales``: their input is multiplied by one and their output divided by the other."""

    def scaled_in(pos: int, x: torch.Tensor) -> torch.Tensor:
        return x if in_scales is None else x * in_scales[pos]

    def scaled_out(pos: int, y: torch.Tensor) -> torch.Tensor:
        return y if out_scales is None else y / out_scales[pos]

    if clt is not None:
        acts: dict[int, torch.Tensor] = {}

        def cross(pos: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def replace(mlp_in: torch.Tensor) -> torch.Tensor:
                x = scaled_in(pos, mlp_in)
                acts[pos] = clt.encode(pos, x)
                return scaled_out(pos, clt.decode_layer(pos, [acts[s] for s in range(pos + 1)], x))

            return replace

        return {layer: cross(pos) for pos, layer in enumerate(layers)}

    def single(pos: int, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        module = per_layer[pos]
        if kind == "sae":
            return lambda mlp_in: scaled_out(
                pos, module(scaled_in(pos, adapter.mlp(layer, mlp_in)))
            )
        return lambda mlp_in: scaled_out(pos, module(scaled_in(pos, mlp_in)))

    return {layer: single(pos, layer) for pos, layer in enumerate(layers)}


@dataclass
class _FVUSums:
    """Running sums for ``sum |y - y_hat|^2 / sum |y - mean y|^2`` over chosen rows."""

    y_sum: torch.Tensor  # (d_model,) float64
    rows: float = 0.0
    err: float = 0.0
    y_sq: float = 0.0

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        """y, y_hat: (n, d_model) float64."""
        self.rows += y.shape[0]
        self.err += float((y - y_hat).pow(2).sum())
        self.y_sum += y.sum(0).cpu()
        self.y_sq += float(y.pow(2).sum())

    def value(self) -> float:
        variance = self.y_sq - float(self.y_sum.pow(2).sum()) / max(self.rows, 1.0)
        return self.err / max(variance, 1e-12)


@dataclass
class _LayerSums:
    """Running sums of one layer's metrics over eval batches."""

    fired: torch.Tensor  # (d_transcoder,) bool
    fvu: _FVUSums  # every real token
    fvu_predicting: _FVUSums  # the positions whose next-token prediction is scored
    ce: "_WindowCE"
    kl: float = 0.0
    top1: float = 0.0
    l0: float = 0.0

    @classmethod
    def zeros(cls, d_model: int, d_transcoder: int) -> "_LayerSums":
        def fvu() -> _FVUSums:
            return _FVUSums(torch.zeros(d_model, dtype=torch.float64))

        return cls(torch.zeros(d_transcoder, dtype=torch.bool), fvu(), fvu(), _WindowCE())


@dataclass
class _WindowCE:
    """Each eval window's CE summed over its counted positions, spliced and ablated,
    batch by batch: the totals, and the windows the bootstrap interval resamples."""

    splice: list[torch.Tensor] = field(default_factory=list)
    ablate: list[torch.Tensor] = field(default_factory=list)

    def add(self, splice: torch.Tensor, ablate: torch.Tensor) -> None:
        """splice, ablate: (B,) this batch's per-window CE."""
        self.splice.append(splice.cpu())
        self.ablate.append(ablate.cpu())

    def totals(self) -> tuple[float, float]:
        return float(torch.cat(self.splice).sum()), float(torch.cat(self.ablate).sum())

    def interval(self, clean: torch.Tensor, counts: torch.Tensor) -> list[float]:
        splice, ablate = torch.cat(self.splice), torch.cat(self.ablate)
        return recovered_interval(clean, splice, ablate, counts=counts)


def _const(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda _mlp_in: value


@torch.no_grad()
def evaluate_set(
    adapter: Any,
    tset: TranscoderSet,
    source: Source,
    *,
    n_windows: int | None = None,
    batch_size: int = 16,
    zoo_dir: str | Path | None = None,
    tokenizer: Any = None,
    max_task_examples: int = 512,
    dead_tokens: int = 65_536,
    split: Split = "eval",
    progress: bool = False,
) -> dict[str, Any]:
    """All metrics of the module docstring as a JSON-ready dict; ``n_windows`` None:
    :func:`default_windows`. ``split`` "train" measures on the windows the set was trained
    on instead (how much of the error is generalization). ``progress`` shows a bar over the
    eval batches."""
    tset.check_fits(adapter)
    check_window_fits(adapter, source)
    layers = tset.layers
    n = min(n_windows or default_windows(source), source.n_windows(split))
    windows = source.get(split, 0, n)
    d_t = tset.d_transcoder
    sums: dict[str, Any] = {
        "tokens": 0.0,
        "pred_tokens": 0.0,
        "kl_all": 0.0,
        "top1_all": 0.0,
    }
    per = {layer: _LayerSums.zeros(tset.d_model, d_t) for layer in layers}
    clean_windows: list[torch.Tensor] = []
    windows_all = _WindowCE()  # every covered layer spliced together
    batches = tqdm(range(0, n, batch_size), desc="evaluating", unit="batch", disable=not progress)
    for lo in batches:
        ids = windows.ids[lo : lo + batch_size].to(adapter.device)
        mask = windows.mask[lo : lo + batch_size].to(adapter.device)
        scored = windows.scored[lo : lo + batch_size].to(adapter.device)
        rec = adapter(ids, record=True)
        clean = rec.logits
        inputs: list[torch.Tensor | None] = [None] * adapter.n_layers
        for layer in layers:
            inputs[layer] = rec.mlp_out[layer] if tset.kind == "sae" else rec.mlp_in[layer]
        estimates = tset.reconstruct(inputs)
        sums["tokens"] += float(mask.sum())
        keep = counted_positions(mask, scored)
        sums["pred_tokens"] += float(keep.sum())
        clean_windows.append(window_ce(clean, ids, keep).cpu())
        predicting = torch.zeros_like(mask)  # the same positions, (B, T)
        predicting[:, :-1] = keep
        for layer in layers:
            stats = per[layer]
            x = inputs[layer]
            assert x is not None
            acts = tset.encode(layer, x)[mask]  # (n, d_t)
            stats.l0 += float((acts > 0).sum())
            stats.fired |= (acts > 0).any(0).cpu()
            y_hat = estimates[layer]
            assert y_hat is not None
            y_true = rec.mlp_out[layer].double()
            stats.fvu.add(y_true[mask], y_hat[mask].double())
            stats.fvu_predicting.add(y_true[predicting], y_hat[predicting].double())
            spliced = adapter(ids, mlp_replacements={layer: _const(y_hat)})
            ablated = adapter(ids, mlp_replacements={layer: _const(torch.zeros_like(y_hat))})
            stats.ce.add(window_ce(spliced, ids, keep), window_ce(ablated, ids, keep))
            stats.kl += float(kl_divergence(clean, spliced, keep))
            stats.top1 += float(top1_matches(clean, spliced, keep))
        spliced_all = adapter(ids, mlp_replacements=all_layer_replacements(adapter, tset))
        zeros = {layer: _const(torch.zeros_like(rec.mlp_out[layer])) for layer in layers}
        ablated_all = adapter(ids, mlp_replacements=zeros)
        windows_all.add(window_ce(spliced_all, ids, keep), window_ce(ablated_all, ids, keep))
        sums["kl_all"] += float(kl_divergence(clean, spliced_all, keep))
        sums["top1_all"] += float(top1_matches(clean, spliced_all, keep))

    dead_sample = _count_firing(adapter, tset, source, split, per, dead_tokens, batch_size)
    n_tok, n_pred = max(sums["tokens"], 1.0), max(sums["pred_tokens"], 1.0)
    clean_ce = torch.cat(clean_windows)
    ce_clean = float(clean_ce.sum()) / n_pred
    counts = resample_counts(clean_ce.numel())  # one draw, shared by every interval
    report: dict[str, Any] = {
        "set_id": tset.metadata.set_id,
        "split": split,
        "tokens": int(n_tok),
        "ce_positions": "answer" if source.answer_only else "all",
        "ce_predictions": int(n_pred),
        "dead_tokens": max(dead_sample, int(n_tok)),
    }
    layer_reports = {}
    for layer in layers:
        stats = per[layer]
        ce_splice, ce_ablate = (total / n_pred for total in stats.ce.totals())
        layer_reports[str(layer)] = {
            "l0": stats.l0 / n_tok,
            "fvu": stats.fvu.value(),
            "fvu_predicting": stats.fvu_predicting.value(),
            "dead_fraction": float((~stats.fired).float().mean()),
            "ce_clean": ce_clean,
            "ce_splice": ce_splice,
            "ce_ablate": ce_ablate,
            "ce_loss_recovered": recovered(ce_clean, ce_splice, ce_ablate),
            "ce_loss_recovered_95": stats.ce.interval(clean_ce, counts),
            "delta_loss": ce_splice - ce_clean,
            "kl": stats.kl / n_pred,
            "top1_agreement": stats.top1 / n_pred,
        }
    ce_all, ce_abl_all = (total / n_pred for total in windows_all.totals())
    report["layers"] = layer_reports
    report["all_layers"] = {
        "ce_clean": ce_clean,
        "ce_splice": ce_all,
        "ce_ablate": ce_abl_all,
        "ce_loss_recovered": recovered(ce_clean, ce_all, ce_abl_all),
        "ce_loss_recovered_95": windows_all.interval(clean_ce, counts),
        "delta_loss": ce_all - ce_clean,
        "kl": sums["kl_all"] / n_pred,
        "top1_agreement": sums["top1_all"] / n_pred,
    }
    values = list(layer_reports.values())
    report["mean"] = {key: sum(v[key] for v in values) / len(values) for key in MEAN_METRICS}
    zoo_dir = None if zoo_dir is None else Path(zoo_dir).expanduser()
    if zoo_dir is not None and (zoo_dir / "zoo.json").is_file():
        report["task"] = task_metric(adapter, tset, zoo_dir, tokenizer, max_task_examples, split)
    return report


@torch.no_grad()
def _count_firing(
    adapter: Any,
    tset: TranscoderSet,
    source: Source,
    split: Split,
    per: dict[int, "_LayerSums"],
    min_tokens: int,
    batch_size: int,
) -> int:
    """Mark in ``per[layer].fired`` every latent that fires on ``split`` windows from the
    start of the split until ``min_tokens`` real tokens were read (or the split ends).
    Only the covered sites are recorded; returns the number of tokens read."""
    site = "mlp_out" if tset.kind == "sae" else "mlp_in"
    layers = tset.layers
    total, start, n = 0, 0, source.n_windows(split)
    # windows per forward: up to 256 while the recorded sites of all covered layers stay
    # within the buffer's per-forward budget (at GPT-2's 1,024-token windows 256 would
    # record 19 GB), never fewer than the eval's ``batch_size``
    per_window = source.width * adapter.d_model * len(layers)
    chunk = max(batch_size, min(256, FLOATS_PER_FORWARD // per_window))
    while total < min_tokens and start < n:
        windows = source.get(split, start, min(chunk, n - start))
        start += windows.ids.shape[0]
        ids = windows.ids.to(adapter.device)
        mask = windows.mask.to(adapter.device)
        inputs, _ = record_sites(adapter, ids, layers, site)
        for i, layer in enumerate(layers):
            acts = tset.encode(layer, inputs[i][mask])  # (n, d_t)
            per[layer].fired |= (acts > 0).any(0).cpu()
        total += int(mask.sum())
    return total


def recovered(ce_clean: float, ce_splice: float, ce_ablate: float) -> float:
    """(CE_ablate - CE_splice) / (CE_ablate - CE_clean); nan when ablation changes nothing."""
    denom = ce_ablate - ce_clean
    return (ce_ablate - ce_splice) / denom if abs(denom) > 1e-12 else float("nan")


#: Bootstrap resamples behind ``ce_loss_recovered_95``.
BOOTSTRAP_RESAMPLES = 1000


def resample_counts(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples, n) float64: how often each of ``n`` windows is drawn, with replacement,
    into each bootstrap resample of n windows. Deterministic under ``seed``."""
    counts = torch.zeros(resamples, n, dtype=torch.float64)
    if n == 0:
        return counts
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (resamples, n), generator=gen)
    return counts.scatter_add_(1, picks, torch.ones_like(counts))


def recovered_interval(
    clean: torch.Tensor,
    splice: torch.Tensor,
    ablate: torch.Tensor,
    level: float = 0.95,
    counts: torch.Tensor | None = None,
) -> list[float]:
    """The ``level`` percentile bootstrap interval of CE loss recovered over windows.

    clean, splice, ablate: (n,) each window's summed CE. Windows (prompts) are resampled
    with replacement, not positions: a text window's predictions share their context.
    ``counts``: the resamples (:func:`resample_counts`, drawn when None), so that the
    intervals of one evaluation share them. [nan, nan] without windows. A resample whose
    ablation changes nothing has no ratio and is left out.
    """
    n = clean.numel()
    if n == 0:
        return [float("nan"), float("nan")]
    counts = resample_counts(n) if counts is None else counts
    c, s, a = (counts @ values.double() for values in (clean, splice, ablate))
    denom = a - c
    ratios = torch.where(denom.abs() > 1e-12, (a - s) / denom, torch.nan)
    tail = (1 - level) / 2
    bounds = torch.nanquantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return [float(bounds[0]), float(bounds[1])]


def fraction_kept(clean: float, spliced: float, baseline: float = 0.0) -> float:
    """How much of the task ability the spliced model keeps, measured from ``baseline``,
    the metric's value without the ability: ``(spliced - baseline) / (clean - baseline)``.

    With baseline 0 this is ``spliced / clean`` (a logit difference, an accuracy). A
    lower-is-better metric needs its baseline: induction's loss ratio (repeated-half loss
    over first-half loss) is 1 without induction, so 0.002 -> 0.009 keeps
    ``0.991 / 0.998``; its raw ``clean / spliced`` would be 0.22, a ratio of two losses
    near 0 that any small absolute change moves a lot. nan when clean equals baseline.
    """
    den = clean - baseline
    return (spliced - baseline) / den if den else float("nan")


@torch.no_grad()
def task_metric(
    adapter: Any,
    tset: TranscoderSet,
    zoo_dir: Path,
    tokenizer: Any,
    max_examples: int = 512,
    split: Split = "eval",
) -> dict[str, Any]:
    """The zoo task's metrics on its held-out examples (or, for ``split`` "train", its
    training examples), clean and with every covered MLP replaced."""
    from ingest.zoo.checkpoint import read_manifest, task_for_spec
    from ingest.zoo.evaluation import encode_examples

    task = task_for_spec(read_manifest(zoo_dir).spec)
    examples = task.examples("heldout" if split == "eval" else "train")[:max_examples]
    totals: dict[str, dict[str, float]] = {"clean": {}, "spliced": {}}
    for lo in range(0, len(examples), 128):
        batch = encode_examples(task, tokenizer, examples[lo : lo + 128])
        ids = batch.input_ids.to(adapter.device)
        runs = {
            "clean": adapter(ids),
            "spliced": adapter(ids, mlp_replacements=all_layer_replacements(adapter, tset)),
        }
        for name, logits in runs.items():
            for metric, values in task.metrics(logits.float().cpu(), batch).items():
                totals[name][metric] = totals[name].get(metric, 0.0) + float(values.sum())
    out: dict[str, Any] = {"task": task.name, "examples": len(examples)}
    for name, metric_sums in totals.items():
        out[name] = task.summarize({k: v / len(examples) for k, v in metric_sums.items()})
    bars = task.quality_bars()
    main = bars[0].metric if bars else next(iter(out["clean"]))
    baseline = bars[0].baseline if bars else 0.0
    clean, spliced = out["clean"].get(main, float("nan")), out["spliced"].get(main, float("nan"))
    out["metric"] = main
    out["baseline"] = baseline
    out["fraction_kept"] = fraction_kept(clean, spliced, baseline)
    if bars:
        out["bar"] = bars[0].describe()
        out["spliced_passes_bar"] = bars[0].passes(out["spliced"])
    return out


def describe_task(task: dict[str, Any]) -> str:
    """One line of :func:`task_metric`'s result, as the command lines print it."""
    metric = task["metric"]
    return (
        f"task {task['task']} {metric} on {task['examples']} examples: "
        f"clean {task['clean'][metric]:.4f}, spliced {task['spliced'][metric]:.4f} "
        f"({100 * task['fraction_kept']:.1f}% kept)"
    )
