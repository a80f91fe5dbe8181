"""Reconstruction and auxiliary losses shared by the per-layer and cross-layer modules.

- Normalized MSE: ``E|y - y_hat|^2 / E|y - mean(y)|^2`` over the batch, the training form
  of the fraction of variance unexplained (FVU).
- AuxK (Gao et al. 2024, section A.2): latents that have not fired for a while ("dead")
  are asked to reconstruct the residual error ``e = y - y_hat`` with their own top-k
  pre-activations; the loss is normalized like the MSE. This gives dead latents a
  gradient and revives them.
"""

from dataclasses import dataclass

import torch

from ingest.transcoders.architectures import topk_indices


@dataclass
class LossParts:
    """Scalar loss terms of one batch and the activations (N, d_transcoder) that fed them."""

    mse: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    acts: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.mse + self.sparsity + self.aux


def normalized_mse(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y_hat, y: (N, d) -> scalar ``sum |y - y_hat|^2 / sum |y - mean y|^2``."""
    var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-8)
    return (y_hat - y).pow(2).sum() / var


def aux_k_loss(
    pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, W_dec: torch.Tensor, k: int
) -> torch.Tensor:
    """pre: (N, d_t); dead: (d_t,) bool; residual: (N, d_out); W_dec: (d_t, d_out).

    Works on the dead columns only (selected first), so its selection and matmuls shrink
    with the number of dead latents.
    """
    columns = dead.nonzero().squeeze(1)
    k = min(k, int(columns.numel()))
    sub = pre.index_select(-1, columns)  # (N, n_dead)
    indices = topk_indices(sub.detach(), k)
    acts = torch.zeros_like(sub).scatter(-1, indices, torch.relu(sub.gather(-1, indices)))
    estimate = acts @ W_dec.index_select(0, columns)
    return normalized_mse(estimate, residual)
