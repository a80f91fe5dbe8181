"""A bounded, shuffled buffer of MLP activations, refilled as it drains.

The buffer holds at most ``capacity_rows`` token rows per covered layer of (input,
target) pairs: (MLP input, MLP output) for transcoders, (MLP output, MLP output) for
SAEs. Refill r runs the model over source windows ``r * W .. (r + 1) * W - 1`` (W =
``capacity_rows // window width``), keeps the real (unpadded) token positions, and draws
a permutation from a generator seeded by ``(seed, r)``. Batches are consecutive slices of
that permutation; when fewer than a batch remain, refill r + 1 replaces the contents.

When the whole split fits (``windows * width <= capacity_rows``, the zoo tasks' prompt
sets at the default budget) the buffer is *resident*: refill 0 collects every window once
and later refills only draw a new permutation of the same rows, one epoch each, instead
of running the model again over the same prompts (the activations would be identical).

Memory is two preallocated ``(n_layers, rows, d_model)`` float32 tensors (one for SAEs),
``rows <= capacity_rows``, and never grows. The state is two integers (refill index and
cursor): resuming re-collects refill r, which gives the same rows in the same order, so a
resumed run sees the same batches as an uninterrupted one. Non-finite activations raise
an error that names the layer.

With ``answer_weight`` != 1 the buffer also keeps one float per row, its loss weight:
``answer_weight`` at the positions that predict a scored token, 1 elsewhere (the trainer
passes it only for answer-only sources, whose scored token is the answer).
"""

import logging
import time
from typing import Any

import torch

from ingest.errors import InvalidArgumentError
from ingest.transcoders.sources import Source, Split, predicting_positions

logger = logging.getLogger(__name__)

#: Refill r of a run seeded s shuffles with seed ``s * _SEED_STRIDE + r``: a prime larger
#: than any refill count, so no two (seed, refill) pairs share a shuffle.
_SEED_STRIDE = 1_000_003


def record_sites(
    adapter: Any, ids: torch.Tensor, layers: list[int], input_site: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ids: (B, T) -> per layer inputs and targets (B, T, d_model), float32, no grad."""
    with torch.no_grad():
        mlp_in, mlp_out = adapter.mlp_sites(ids, layers)  # stops after the last layer
    targets = [t.float() for t in mlp_out]
    inputs = targets if input_site == "mlp_out" else [t.float() for t in mlp_in]
    return inputs, targets


def check_window_fits(adapter: Any, source: Source) -> None:
    """A clear error, naming the flag, when the source's windows exceed the model's context."""
    n_ctx = getattr(adapter, "n_ctx", None)
    if n_ctx is not None and source.width > n_ctx:
        raise InvalidArgumentError(
            f"prompt source {source.name!r} gives windows of {source.width} tokens but the "
            f"model's context is {n_ctx}: pass --context-len {n_ctx} or less (text sources) "
            f"or shorter prompts"
        )


def check_finite(tensor: torch.Tensor, layer: int, site: str, where: str) -> None:
    # A NaN or inf anywhere makes the sum non-finite: one reduction instead of four passes
    # (isfinite, all); only a sum that overflowed needs the elementwise check.
    if bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidArgumentError(
            f"non-finite (NaN or inf) {site} activations at layer {layer} ({where}): the model "
            f"produces NaN/inf on these prompts; check the checkpoint's weights, load it in "
            f"float32, or use other prompts"
        )


#: Floats per recorded (tokens, d_model) tensor that pick the automatic model batch:
#: 2^21 (8 MiB in float32) is 32,768 tokens at d_model 64 and 2,730 at 768. Small
#: forwards are dominated by per-call overhead (on the zoo models, 2,048-token forwards
#: collected 2.5-6x fewer tokens/s than 65,536-token ones); very large ones by memory
#: traffic, since the MLP's hidden layer is 4 d_model wide: collecting greater-than
#: GPT-2's training split (152k tokens; best of 4) took 1.72 s at 65,534 tokens per
#: forward, 1.20 s at 32,760, 1.13 s at 16,380 and 1.11 s at 7,168.
FLOATS_PER_FORWARD = 2**21

_FLOAT_BYTES = 4


def rows_for_budget(
    budget_mb: float, n_layers: int, d_model: int, sae: bool = False, weighted: bool = False
) -> int:
    """Token rows per layer that ``budget_mb`` MiB of float32 buffer storage holds: one
    ``d_model`` vector per layer for SAEs (input = target), two for transcoders, and one
    float per row for the row weights (``weighted``)."""
    per_row = (n_layers * (1 if sae else 2) * d_model + int(weighted)) * _FLOAT_BYTES
    return int(budget_mb * 2**20 // per_row)


def _windows_per_forward(requested: int, width: int, d_model: int) -> int:
    """``requested`` windows per model forward, or (0) ``FLOATS_PER_FORWARD`` floats'
    worth of ``d_model``-wide rows."""
    return requested if requested > 0 else max(1, FLOATS_PER_FORWARD // d_model // width)


class ActivationBuffer:
    """Shuffled (input, target) rows for the covered layers, bounded by ``capacity_rows``."""

    def __init__(
        self,
        adapter: Any,
        source: Source,
        layers: list[int],
        *,
        capacity_rows: int,
        batch_size: int,
        seed: int,
        input_site: str = "mlp_in",
        model_batch_size: int = 0,
        split: Split = "train",
        device: torch.device | str = "cpu",
        answer_weight: float = 1.0,
    ) -> None:
        if input_site not in ("mlp_in", "mlp_out"):
            raise InvalidArgumentError(f"input_site must be mlp_in or mlp_out, got {input_site!r}")
        check_window_fits(adapter, source)
        if capacity_rows < source.width:
            raise InvalidArgumentError(
                f"buffer of {capacity_rows} rows cannot hold one window of {source.width} "
                f"tokens: raise --buffer-mb or --buffer-rows to at least {source.width} rows"
            )
        if batch_size > capacity_rows // 2:
            raise InvalidArgumentError(
                f"batch size {batch_size} needs a buffer of at least {2 * batch_size} rows, "
                f"got {capacity_rows}: raise --buffer-mb or --buffer-rows"
            )
        self.adapter = adapter
        self.source = source
        self.layers = list(layers)
        self.batch_size = batch_size
        self.seed = seed
        self.input_site = input_site
        self.model_batch_size = _windows_per_forward(
            model_batch_size, source.width, adapter.d_model
        )
        self.split: Split = split
        self.device = torch.device(device)
        n_windows = source.n_windows(split)
        #: The whole split fits: collected once, reshuffled at every later refill.
        self.resident = n_windows * source.width <= capacity_rows
        self.windows_per_refill = n_windows if self.resident else capacity_rows // source.width
        rows = self.windows_per_refill * source.width
        d = adapter.d_model
        self._y = torch.empty(len(layers), rows, d, device=self.device)
        self._x = self._y if input_site == "mlp_out" else torch.empty_like(self._y)
        self.answer_weight = answer_weight
        #: Each row's loss weight, or None when every row weighs the same.
        self._weight = None if answer_weight == 1.0 else torch.empty(rows, device=self.device)
        self.refill_index = -1
        self.cursor = 0
        self.n_rows = 0
        self._perm = torch.empty(0, dtype=torch.long)
        #: Wall seconds spent collecting activations (model forwards and copies) so far.
        self.collect_seconds = 0.0

    @property
    def capacity_rows(self) -> int:
        return self._y.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the activation storage (constant for the buffer's life)."""
        total = self._y.numel() * self._y.element_size()
        if self._x is not self._y:
            total += self._x.numel() * self._x.element_size()
        if self._weight is not None:
            total += self._weight.numel() * self._weight.element_size()
        return total

    def _fill(self, refill: int) -> None:
        if not self.resident or self.refill_index < 0:  # a resident split is collected once
            self.n_rows = self._collect(refill)
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + refill)
        self._perm = torch.randperm(self.n_rows, generator=gen).to(self.device)
        self.refill_index = refill
        self.cursor = 0

    def _collect(self, refill: int) -> int:
        """Run the model over refill ``refill``'s windows into the storage; rows written."""
        began = time.perf_counter()
        start = refill * self.windows_per_refill
        windows = self.source.get(self.split, start, self.windows_per_refill)
        offset = 0
        for lo in range(0, self.windows_per_refill, self.model_batch_size):
            ids = windows.ids[lo : lo + self.model_batch_size].to(self.adapter.device)
            mask = windows.mask[lo : lo + self.model_batch_size].to(self.adapter.device)
            inputs, targets = record_sites(self.adapter, ids, self.layers, self.input_site)
            n = int(mask.sum())
            if self._weight is not None:
                scored = windows.scored[lo : lo + self.model_batch_size].to(self.adapter.device)
                predicting = predicting_positions(mask, scored)[mask]
                weight = torch.where(predicting, self.answer_weight, 1.0)
                self._weight[offset : offset + n] = weight.to(self.device)
            for i, layer in enumerate(self.layers):
                y = targets[i][mask]  # (n, d)
                check_finite(y, layer, "MLP output", f"refill {refill}")
                self._y[i, offset : offset + n] = y.to(self.device)
                if self._x is not self._y:
                    x = inputs[i][mask]
                    check_finite(x, layer, "MLP input", f"refill {refill}")
                    self._x[i, offset : offset + n] = x.to(self.device)
            offset += n
        if offset < self.batch_size:
            fix = (
                "lower --batch-size or give more prompts"
                if self.resident
                else "raise --buffer-mb or lower --batch-size"
            )
            raise InvalidArgumentError(
                f"refill {refill} yielded {offset} token rows, fewer than the batch size "
                f"{self.batch_size}: {fix}"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.collect_seconds += time.perf_counter() - began
        logger.debug("buffer refill %d: %d rows collected", refill, offset)
        return offset

    def prime(self, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Collect refill 0 if nothing is held yet; the held rows (n_layers, n, d): all of
        them in collection order, or at most ``max_rows`` drawn in the current permutation's
        order (a copy, bounded however large a resident split is)."""
        if self.refill_index < 0:
            self._fill(0)
        if max_rows is None or max_rows >= self.n_rows:
            return self._x[:, : self.n_rows], self._y[:, : self.n_rows]
        idx = self._perm[:max_rows]
        return self._x.index_select(1, idx), self._y.index_select(1, idx)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, y, weight): x, y (n_layers, batch_size, d_model); weight (batch_size,) row
        weights, or None when every row weighs the same."""
        if self.refill_index < 0 or self.cursor + self.batch_size > self.n_rows:
            self._fill(self.refill_index + 1)
        idx = self._perm[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        # index_select: about 4x faster than advanced indexing for these row gathers on CPU
        weight = None if self._weight is None else self._weight.index_select(0, idx)
        return self._x.index_select(1, idx), self._y.index_select(1, idx), weight

    def state_dict(self) -> dict[str, int]:
        return {"refill_index": self.refill_index, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        refill = int(state["refill_index"])
        if refill >= 0:
            self._fill(refill)
        self.cursor = int(state["cursor"])


def collect(
    adapter: Any,
    source: Source,
    layers: list[int],
    *,
    n_windows: int,
    input_site: str = "mlp_in",
    split: Split = "eval",
    model_batch_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed activation set: (x, y) each (n_layers, N, d_model) on the adapter's device."""
    windows = source.get(split, 0, min(n_windows, source.n_windows(split)))
    model_batch_size = _windows_per_forward(model_batch_size, source.width, adapter.d_model)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for lo in range(0, windows.ids.shape[0], model_batch_size):
        ids = windows.ids[lo : lo + model_batch_size].to(adapter.device)
        mask = windows.mask[lo : lo + model_batch_size].to(adapter.device)
        inputs, targets = record_sites(adapter, ids, layers, input_site)
        for i, layer in enumerate(layers):
            check_finite(inputs[i], layer, "MLP input", f"{split} split")
            check_finite(targets[i], layer, "MLP output", f"{split} split")
        xs.append(torch.stack([t[mask] for t in inputs]))
        ys.append(torch.stack([t[mask] for t in targets]))
    return torch.cat(xs, 1), torch.cat(ys, 1)
