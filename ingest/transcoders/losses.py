"""Reconstruction and auxiliary losses shared by the per-layer and cross-layer modules.

- Normalized MSE: ``E|y - y_hat|^2 / E|y - mean(y)|^2`` over the batch, the training form
  of the fraction of variance unexplained (FVU).
- AuxK (Gao et al. 2024, section A.2): latents that have not fired for a while ("dead")
  are asked to reconstruct the residual error ``e = y - y_hat`` with their own top-k
  pre-activations; the loss is normalized like the MSE. This gives dead latents a
  gradient and revives them. It is computed on the first rows of each shuffled batch (a
  uniform sample, so the same loss in expectation) and the dead columns only. Its
  selection costs rows x dead columns, which over every row of a batch was a quarter to
  a half of a CPU training step where most latents are dead; so the rows follow a budget
  (:func:`aux_k_row_count`): ``aux_k_rows`` (default 256) when every latent is dead, and
  proportionally more, up to the whole batch, as fewer are.

:func:`static_aux_k_loss` is the same loss in fixed shapes, for a compiled step
(``TrainConfig.compile``): the first ``aux_k_rows`` rows always, every column with the
live ones masked out, and no test of whether any latent is dead (its term is multiplied
by that instead), so it has no data-dependent shape and nothing the host waits for.

Both take optional per-row weights (the trainer's ``answer_weight``): a row of weight w
counts as w copies of itself, so integer weights give exactly the loss of the batch with
its rows repeated (tested).
"""

from dataclasses import dataclass

import torch

from ingest.transcoders.architectures import topk_indices


@dataclass
class LossParts:
    """Scalar loss terms of one batch, which latents fired in it and its mean L0.

    ``fired``: (d_transcoder,) bool, or (n_layers, d_transcoder) for several modules;
    ``l0``: scalar tensor, active latents per token (averaged over modules).
    """

    mse: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    fired: torch.Tensor
    l0: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.mse + self.sparsity + self.aux


def activity(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """acts: (N, d_t) -> (which latents fired (d_t,) bool, mean active latents per token)."""
    with torch.no_grad():
        active = acts > 0
        return active.any(0), active.sum(-1).float().mean()


def normalized_mse(
    y_hat: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """y_hat, y: (N, d); weight: (N,) or None -> scalar
    ``sum w |y - y_hat|^2 / sum w |y - mean_w y|^2`` (w = 1 without weights)."""
    if weight is None:
        var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-8)
        return (y_hat - y).pow(2).sum() / var
    w = weight[:, None]
    mean = (w * y).sum(0) / weight.sum()
    var = (w * (y - mean).pow(2)).sum().clamp_min(1e-8)
    return (w * (y_hat - y).pow(2)).sum() / var


def aux_k_dead(dead: torch.Tensor | None, coefficient: float) -> torch.Tensor | None:
    """``dead`` (d_t,) when AuxK runs this step (a latent is dead and AuxK has weight),
    else None: the one gate of every module's AuxK."""
    if dead is None or coefficient <= 0 or not bool(dead.any()):
        return None
    return dead


def aux_k_row_count(row_budget: int, n_dead: int, d_transcoder: int, batch: int) -> int:
    """Rows AuxK uses this step: ``row_budget`` rows' worth of selection entries
    (``row_budget x d_transcoder``) spread over the ``n_dead`` dead columns, at most
    ``batch``. Since ``n_dead <= d_transcoder``, that is at least ``row_budget`` rows.

    ``row_budget`` 0 means every row. With 256 and 512 latents: 319 rows at 410 dead
    (80%), 2,570 at 51 (10%), and the whole 4,096-row batch at 32 dead (6.25%) or fewer.
    """
    if row_budget <= 0 or n_dead <= 0:
        return batch
    return min(batch, row_budget * d_transcoder // n_dead)


def aux_k_loss(
    pre: torch.Tensor,
    dead: torch.Tensor,
    residual: torch.Tensor,
    W_dec: torch.Tensor,
    k: int,
    row_budget: int = 0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """pre: (N, d_t); dead: (d_t,) bool; residual: (N, d_out); W_dec: (d_t, d_out);
    weight: (N,) row weights or None.

    Uses the first :func:`aux_k_row_count` rows (``row_budget`` 0: all; batches are
    shuffled, so they are a uniform sample) and the dead columns only (selected first), so its
    selection and matmuls shrink with both.
    """
    columns = dead.nonzero().squeeze(1)
    n = aux_k_row_count(row_budget, int(columns.numel()), dead.numel(), pre.shape[0])
    pre, residual = pre[:n], residual[:n]
    weight = None if weight is None else weight[:n]
    k = min(k, int(columns.numel()))
    sub = pre.index_select(-1, columns)  # (N, n_dead)
    indices = topk_indices(sub.detach(), k)
    acts = torch.zeros_like(sub).scatter(-1, indices, torch.relu(sub.gather(-1, indices)))
    estimate = acts @ W_dec.index_select(0, columns)
    return normalized_mse(estimate, residual, weight)


def static_aux_k_loss(
    pre: torch.Tensor,
    dead: torch.Tensor,
    residual: torch.Tensor,
    W_dec: torch.Tensor,
    k: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """pre: (R, d_t) the rows AuxK uses; dead: (d_t,) bool; residual: (R, d_out); W_dec:
    (d_t, d_out); weight: (R,) or None -> the AuxK loss in fixed shapes (module doc).

    Each row's ``k`` largest pre-activations among the dead columns, ReLU'd, decode its
    estimate of the residual; where fewer than ``k`` latents are dead, the live columns a
    row's top ``k`` takes in addition count zero. Zero when no latent is dead.
    """
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    picks = masked.topk(min(k, pre.shape[-1]), dim=-1, sorted=False).indices  # (R, k)
    chosen = torch.zeros(pre.shape, dtype=torch.bool, device=pre.device)
    chosen = chosen.scatter_(-1, picks, True) & dead
    # dense over the R rows: a gather of W_dec's rows would back-propagate by a scatter-add
    # whose order, compiled, varies from run to run; the matmul's does not
    estimate = (pre.relu() * chosen) @ W_dec
    any_dead = dead.any().to(pre.dtype)
    return any_dead * normalized_mse(estimate, residual, weight)
