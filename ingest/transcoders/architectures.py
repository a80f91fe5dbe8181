"""Activation functions and sparsity penalties of the transcoder architectures.

Every architecture is a small ``nn.Module`` that maps pre-activations to activations
(``forward``) and returns its sparsity penalty given the pre-activations, the activations
and the decoder-row norms. They are looked up through
:data:`ingest.transcoders.config.ARCHITECTURES`.

Penalties are dimensionless because the trainer scales inputs and targets so that
``E|x|^2 = d`` (the convention of SAELens and Gemma Scope) and normalizes the squared
error by the target variance.

- ReLU (Dunefsky et al. 2024; decoder-norm weighting from Anthropic's April 2024 update):
  ``penalty = lambda * sum_i z_i |d_i| / sqrt(d_out)``.
- TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the k
  largest ReLU'd pre-activations; no penalty (sparsity is fixed), dead latents are
  revived by the AuxK loss computed by the module.
- JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): ``z = pre * H(pre - theta)``,
  theta learned per latent (stored as it is, so that files round-trip bit-exactly, and
  clamped positive after each step); the Heaviside step gets a straight-through gradient
  with a rectangle kernel of width ``bandwidth`` so theta learns;
  ``penalty = lambda * sum_i H(pre_i - theta_i)`` (L0).
- BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"): in training keep
  the ``N k`` largest ReLU'd pre-activations of the whole (N, w) batch, so a token may
  use more or fewer than k latents and the mean is k; a running average of the smallest
  kept value becomes a threshold, and inference is JumpReLU with it, so the trained
  module encodes a token without its batch.
"""

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from ingest.transcoders.config import TranscoderConfig


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """``pre * H(pre - theta)``; d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta).to(pre.dtype)
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return grad_pre, _sum_to(grad_theta, theta.shape), None


class _StepFunction(torch.autograd.Function):
    """``H(pre - theta)``; d/dtheta = -(1 / eps) K((pre - theta) / eps), no grad to pre."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad
        return torch.zeros_like(pre), _sum_to(grad_theta, theta.shape), None


def row_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """values: (N,) -> their mean, weighted by ``weight`` (N,) when given."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum()


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    return grad


class Activation(nn.Module):
    """Base of the architectures: ``forward(pre) -> acts`` and ``penalty``."""

    #: Whether ``penalty`` reads the decoder-row norms (others get None, saving a pass).
    uses_decoder_norms = False

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_forward(self, pre: torch.Tensor) -> torch.Tensor:
        """The activations the training loss uses: ``forward``'s unless the architecture
        selects over the batch (BatchTopK)."""
        return self(pre)

    def penalty(
        self,
        pre: torch.Tensor,
        acts: torch.Tensor,
        dec_norms: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pre, acts: (N, d_transcoder); dec_norms: (d_transcoder,); weight: (N,) row
        weights or None -> scalar: the (weighted) mean over rows of a per-row penalty.
        Zero here: TopK and BatchTopK fix the sparsity instead of penalizing it."""
        return pre.new_zeros(())

    def take_bias_change(self) -> torch.Tensor | None:
        """(d_transcoder,) to add to the encoder bias after the optimizer step, or None
        (BatchTopK's firing floor has one)."""
        return None

    def reset_latents_(self, latents: torch.Tensor) -> None:
        """Resampling gave ``latents`` a fresh encoder: drop state kept about the old one.
        Nothing is kept here."""

    #: Whether :meth:`calibrate_` sets anything: the trainer draws calibration rows only then.
    calibrates = False
    #: Whether training batches move the threshold inference uses (BatchTopK's running
    #: average); the trainer clears it through the end-to-end steps, whose KL runs at that
    #: threshold. Activations without such a threshold ignore it.
    tracks_threshold = True

    def calibration_pool(
        self, pool: torch.Tensor | None, pre: torch.Tensor, rows: int
    ) -> torch.Tensor | None:
        """Fold one (B, w) chunk of pre-activations into ``pool``, what :meth:`calibrate_`
        needs of ``rows`` training rows, so that chunks can be consumed as they come.
        Nothing is kept here."""
        return pool

    def calibrate_(self, pres: Iterable[torch.Tensor], rows: int) -> None:
        """After training: fit inference state to ``pres``, the pre-activations of
        ``rows`` training rows in (B, w) chunks (or pools of them). Nothing to fit here."""


class ReLUActivation(Activation):
    """``z = relu(pre)`` with a decoder-norm-weighted L1 penalty."""

    uses_decoder_norms = True

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.l1_coefficient = float(cfg.sparsity)
        self.d_out = cfg.d_out

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def penalty(
        self,
        pre: torch.Tensor,
        acts: torch.Tensor,
        dec_norms: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert dec_norms is not None
        l1 = row_mean((acts * dec_norms).sum(-1), weight)
        return self.l1_coefficient * l1 / self.d_out**0.5


#: Latents per chunk in :func:`topk_indices`' first pass (8 measured fastest at width 512).
TOPK_CHUNK = 8


@torch.no_grad()
def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: (N, w) -> (N, k) column indices of each row's k largest, in no order.

    Exact and about 1.9x faster than ``torch.topk`` on CPU at (1024, 512), k = 16: the
    first ``w0 = w - w % g`` columns are split into ``w0 / g`` strided chunks of ``g``;
    every top-k element lies in one of the k chunks with the largest maxima (a chunk
    outside them has k larger chunk maxima, hence k larger elements) or among the
    ``w % g`` columns left over, so one ``topk`` over the (N, w0 / g) chunk maxima and one
    over the (N, k g + w % g) candidates replace the ``topk`` over (N, w). It is used
    when the candidates are at most half the columns; otherwise ``torch.topk`` is used.
    Ties may pick other columns of equal value than ``torch.topk`` would.
    """
    n, w = scores.shape[0], scores.shape[-1]
    g = TOPK_CHUNK
    w0 = w - w % g
    chunks = w0 // g
    # It pays only when the candidates are at most half the columns: AuxK's k = 32 over
    # ~360 dead latents ran 15% slower chunked. Measured on CPU only; CUDA's topk is a
    # different kernel, so it keeps torch.topk.
    if (
        scores.device.type != "cpu"
        or scores.dim() != 2
        or 2 * (k * g + w - w0) > w
        or torch.compiler.is_compiling()
    ):
        return scores.topk(k, dim=-1, sorted=False).indices
    scores = scores.contiguous()
    # chunk j: columns j, j + chunks, ..., of the first w0 (a view, no copy)
    strided = scores.as_strided((n, g, chunks), (w, chunks, 1))
    best = strided.amax(1).topk(k, dim=-1, sorted=False).indices  # (n, k)
    members = strided.gather(2, best[:, None, :].expand(n, g, k)).reshape(n, g * k)
    if w0 < w:
        members = torch.cat([members, scores[:, w0:]], 1)
    pos = members.topk(k, dim=-1, sorted=False).indices  # (n, k) into (g, k) [+ rest]
    in_chunk = pos.clamp_max(g * k - 1)
    chunked = best.gather(1, in_chunk % k) + (in_chunk // k) * chunks
    return torch.where(pos < g * k, chunked, pos - g * k + w0)


#: Every SAMPLE_STRIDE-th value estimates :func:`largest_indices`' threshold (a prime, so
#: the sample meets every latent column of an (N, w) batch flattened row by row).
SAMPLE_STRIDE = 61


@torch.no_grad()
def largest_indices(values: torch.Tensor, m: int, slack: float = 1.1) -> torch.Tensor:
    """values: (n,) -> (m,) indices of its m largest, in ascending order.

    Exact, and 7-13x faster than ``torch.topk`` on CPU for BatchTopK's (4,096 x 512-1,024)
    values and m = 4-16 per row: a strided sample's quantile gives a threshold t that about
    ``slack * m`` values reach; when at least m do, the m largest are among them, and only
    the few surplus smallest candidates are dropped by a small ``topk``. When fewer reach
    t, or m is over a quarter of n, it is ``torch.topk`` over everything.
    """
    n = values.numel()
    # A compiled step (TrainConfig.compile) needs fixed shapes: the candidates' count is
    # data-dependent, so it takes torch.topk.
    if 4 * m > n or values.device.type != "cpu" or torch.compiler.is_compiling():
        return values.topk(m, sorted=False).indices.sort().values
    sample = values[::SAMPLE_STRIDE]
    rank = min(sample.numel(), int(m / n * sample.numel() * slack) + 16)
    threshold = sample.kthvalue(sample.numel() - rank + 1).values
    candidates = (values >= threshold).nonzero().squeeze(1)
    surplus = candidates.numel() - m
    if surplus < 0:
        return values.topk(m, sorted=False).indices.sort().values
    keep = torch.ones_like(candidates, dtype=torch.bool)
    if surplus > 0:
        drop = values[candidates].topk(surplus, largest=False, sorted=False).indices
        keep[drop] = False
    return candidates[keep]


class Selection(NamedTuple):
    """The active entries of an (N, w) batch of pre-activations, grouped by row in row
    order: entry j is at (``rows[j]``, ``columns[j]``); row i's entries start at
    ``offsets[i]`` (an ``embedding_bag``'s offsets)."""

    rows: torch.Tensor  # (M,)
    columns: torch.Tensor  # (M,)
    offsets: torch.Tensor  # (N,)

    def positions(self, width: int) -> torch.Tensor:
        """(M,) positions in the flattened (N, width) matrix."""
        return torch.add(self.columns, self.rows, alpha=width)


class SelectingActivation(Activation):
    """An architecture whose training activations are ``relu(pre)`` at entries it
    selects (TopK, BatchTopK): it trains through the sparse step
    (:func:`ingest.transcoders.sparse.sparse_forward`), and ``train_forward`` is that
    step's dense reference."""

    def select(self, pre: torch.Tensor) -> Selection:
        """pre: (N, w), no gradient -> the active entries."""
        raise NotImplementedError

    def train_forward(self, pre: torch.Tensor) -> torch.Tensor:
        # The largest of pre are the largest of relu(pre) up to ties at zero, which the
        # ReLU maps to the same activations (and gradients).
        width = pre.shape[-1]
        flat = pre.reshape(-1)
        positions = self.select(pre.detach().reshape(-1, width)).positions(width)
        values = torch.relu(flat.gather(0, positions))
        return torch.zeros_like(flat).scatter(0, positions, values).view(pre.shape)


class TopKActivation(SelectingActivation):
    """Keep the k largest of ``relu(pre)`` per token, zero the rest."""

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.k = cfg.k

    def select(self, pre: torch.Tensor) -> Selection:
        n, k = pre.shape[0], self.k
        columns = topk_indices(pre, k).reshape(-1)
        rows = torch.arange(n, device=pre.device)[:, None].expand(n, k).reshape(-1)
        return Selection(rows, columns, torch.arange(0, n * k, k, device=pre.device))

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return self.train_forward(pre)


class JumpReLUActivation(Activation):
    """``z = pre * H(pre - theta)`` with a learned per-latent threshold and an L0 penalty."""

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.l0_coefficient = float(cfg.sparsity)
        self.bandwidth = float(cfg.jumprelu_bandwidth)
        # Stored directly (not as a log) so files round-trip bit-exactly.
        self.init_threshold = float(cfg.jumprelu_init_threshold)
        self.threshold = nn.Parameter(torch.full((cfg.d_transcoder,), self.init_threshold))

    @torch.no_grad()
    def clamp_(self, floor: float = 1e-6) -> None:
        """Keep theta positive after an optimizer step."""
        self.threshold.clamp_(min=floor)

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)

    @torch.no_grad()
    def reset_latents_(self, latents: torch.Tensor) -> None:
        """A resampled latent's threshold starts where a new one's does: the old one may
        lie above every pre-activation of its fresh encoder row."""
        self.threshold[latents] = self.init_threshold

    def penalty(
        self,
        pre: torch.Tensor,
        acts: torch.Tensor,
        dec_norms: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        l0 = row_mean(_StepFunction.apply(pre, self.threshold, self.bandwidth).sum(-1), weight)
        return self.l0_coefficient * l0


class BatchTopKActivation(SelectingActivation):
    """Training: the ``N k`` largest of ``relu(pre)`` over the (N, w) batch. Inference:
    ``pre * H(pre - theta)`` with theta the running average of the smallest kept value,
    which the trainer finally calibrates (:meth:`calibrate_`) so that k latents per token
    fire on training rows.

    With ``balance_rate`` > 0 every latent has a firing floor, after the bias-only load
    balancing of mixture-of-experts routers (Wang et al. 2024): after each batch, a
    latent whose firing count, averaged over the last batches (``fired_ema``, weight
    ``EMA_WEIGHT`` on the newest), is under ``FLOOR`` x the mean count ``N k / w`` has its
    encoder bias raised by ``balance_rate x theta``; one at the mean count or more has
    what was added so far taken back by as much. The average matters: at a floor of one
    token per batch a latent that misses it by chance in one batch would be raised again
    and again, and the raises, shared by nearly every latent, lifted the threshold and
    with it the step until training diverged (k 4). ``balance`` (d_transcoder,) holds
    what was added; :meth:`take_bias_change` hands the change to the module, which
    applies it after the optimizer step. A latent the others outcompete thus fires on its
    best-matching tokens at about the floor and gets the reconstruction's gradient
    there; one that fires on its own keeps its learned bias. Inference and files are
    unchanged: the bias is the encoder's.
    """

    #: Weight of the previous threshold in the running average (~100 steps remembered).
    momentum = 0.99
    #: The firing floor as a fraction of the mean firing count per latent (N k / w).
    FLOOR = 1 / 32
    #: Weight of the newest batch in the running average of firing counts (~10 batches).
    EMA_WEIGHT = 0.1
    calibrates = True

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.k = cfg.k
        self.balance_rate = float(cfg.balance_rate)
        # One value for every latent (stored per latent: the files' JumpReLU layout). Zero
        # until the first training batch sets it; not trained by gradient.
        self.threshold = nn.Parameter(torch.zeros(cfg.d_transcoder), requires_grad=False)
        self.balance: torch.Tensor
        self.register_buffer("balance", torch.zeros(cfg.d_transcoder))
        # firing counts per batch, averaged; negative where unknown (before the first
        # batch, and for resampled latents): the next batch's count sets them
        self.fired_ema: torch.Tensor
        self.register_buffer("fired_ema", torch.full((cfg.d_transcoder,), -1.0))
        self._pending: torch.Tensor | None = None

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold).to(pre.dtype)

    def select(self, pre: torch.Tensor) -> Selection:
        """The batch's ``N k`` largest (k <= width: validated); a training step, so it
        moves the threshold and, with a firing floor, prepares the bias change."""
        n, width = pre.shape
        flat = pre.reshape(-1)
        positions = largest_indices(flat, self.k * n)  # ascending: grouped by row
        kept = flat.index_select(0, positions)
        self._update_threshold(kept)
        rows = positions.div(width, rounding_mode="floor")
        columns = positions - rows * width
        if self.balance_rate > 0:
            self._prepare_balance(columns, kept > 0, n)
        # rows ascend, so row i's entries start where the first row >= i is
        offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        return Selection(rows, columns, offsets)

    # These updates stay on the device: no data-dependent shape and no read back to the
    # host, which on a GPU would wait for the step's queued kernels.
    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        if not self.tracks_threshold:
            return
        # the smallest positive kept value; +inf when none is (the threshold stays)
        smallest = torch.where(kept > 0, kept, torch.inf).amin()
        averaged = self.threshold * self.momentum + (1 - self.momentum) * smallest
        # zero until the first batch: the first batch's value then sets it
        updated = torch.where(self.threshold == 0, smallest, averaged)
        self.threshold.copy_(torch.where(smallest.isfinite(), updated, self.threshold))

    @torch.no_grad()
    def _prepare_balance(self, columns: torch.Tensor, positive: torch.Tensor, n: int) -> None:
        """columns: (M,) the selected entries' latents; positive: (M,) whether each fired."""
        width = self.balance.numel()
        ones = positive.to(self.fired_ema.dtype)
        count = self.fired_ema.new_zeros(width).index_add_(0, columns, ones)
        averaged = torch.lerp(self.fired_ema, count, self.EMA_WEIGHT)
        fired = self.fired_ema.copy_(torch.where(self.fired_ema < 0, count, averaged))
        step = self.balance_rate * self.threshold[0]
        mean = n * self.k / width
        zero = torch.zeros_like(self.balance)
        change = torch.where(fired < self.FLOOR * mean, step, zero)
        # Taken back only from a latent that fires at the mean count or more: between the
        # two a latent keeps its raise, so it does not drop back under the floor.
        change = torch.where(fired >= mean, -torch.minimum(self.balance, step), change)
        self._pending = change

    @torch.no_grad()
    def calibration_pool(
        self, pool: torch.Tensor | None, pre: torch.Tensor, rows: int
    ) -> torch.Tensor:
        """Values of ``pool`` and ``pre`` (flat) that hold their ``k rows + 1`` largest.

        The pool is cut to those largest only once it holds twice as many: cutting at
        every chunk made a run with small batches sort the whole pool per batch (4,098
        sorts of 262,145 values for 65,536 rows at k 4 and batches of 32).
        """
        values = pre.reshape(-1) if pool is None else torch.cat([pool, pre.reshape(-1)])
        m = self.k * rows + 1
        if values.numel() <= 2 * m:
            return values
        return values.index_select(0, largest_indices(values, m))

    @torch.no_grad()
    def calibrate_(self, pres: Iterable[torch.Tensor], rows: int) -> None:
        """Set the threshold midway between the ``k rows``-th and the next largest of the
        pre-activations, so that exactly ``k`` latents per row fire on these rows on
        average, as the training batches selected.

        The running average of each batch's smallest kept value lands near that point
        but not on it, and many pre-activations sit close to it (the selection's edge):
        on greater-than GPT-2 at k 4, a threshold 2% above the pooled quantile made the
        inference L0 2.9 on the training rows. Where fewer than ``k rows`` values are
        positive, or the rows have no more than ``k rows`` values (width k), the running
        average is kept.
        """
        m = self.k * rows + 1
        top: torch.Tensor | None = None
        for pre in pres:
            top = self.calibration_pool(top, pre, rows)
        if top is None or top.numel() < m:
            return
        top = top.index_select(0, largest_indices(top, m))
        below, edge = top.topk(2, largest=False).values.tolist()  # (kN+1)-th, kN-th largest
        if edge > 0:
            self.threshold.fill_(max(below, 0.0) / 2 + edge / 2)

    @torch.no_grad()
    def take_bias_change(self) -> torch.Tensor | None:
        """The encoder-bias change of the last training batch (recorded in ``balance``),
        or None; each change is handed out once."""
        change, self._pending = self._pending, None
        if change is not None:
            self.balance.add_(change)
        return change

    @torch.no_grad()
    def reset_latents_(self, latents: torch.Tensor) -> None:
        """Latents given a fresh encoder (resampling) start without an added bias and
        with their firing average unknown."""
        self.balance[latents] = 0.0
        self.fired_ema[latents] = -1.0


def build_activation(cfg: TranscoderConfig) -> Activation:
    """The activation module the config's architecture names."""
    activation = cfg.spec.implementation()(cfg)
    if not isinstance(activation, Activation):
        raise TypeError(f"{cfg.spec.impl} does not build an Activation")
    return activation
