"""Resampling dead latents (Anthropic 2023, "Towards Monosemanticity", simplified).

Every ``resample_every`` steps until the learning-rate decay, each latent that has not
fired for ``dead_after_tokens`` tokens is re-initialized on a token the model currently
reconstructs badly: tokens of the current batch are drawn with probability proportional
to their squared error (times their row weight, when the batch has weights); the
latent's encoder row becomes that token's input direction scaled to 0.2 x the mean norm
of the live encoder rows (centered on the batch mean by its bias, so it fires on the
chosen token), its decoder row the normalized residual ``y - y_hat`` (norm of the live
decoder rows, or 1 for unit-norm architectures), its activation state starts afresh
(``Activation.reset_latents_``: JumpReLU's threshold back at its initial value, BatchTopK's
firing-floor state dropped), and its Adam moments are reset. Where every latent of a layer
is dead, the norms are those of all its rows. Draws come from a generator seeded by
(seed, step), so resampling is deterministic and resumable. AuxK (see ``losses``) works
alongside: resampling relocates latents, AuxK trains them.
"""

import torch

from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.transcoder import Transcoder


def _reset_moments(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    rows: torch.Tensor | tuple[int, torch.Tensor],
) -> None:
    """Zero ``param``'s Adam moments at ``rows`` (an index into its first dimensions)."""
    state = optimizer.state.get(param, {})
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            state[name][rows] = 0.0


def _choose(
    x: torch.Tensor,
    y: torch.Tensor,
    y_hat: torch.Tensor,
    n: int,
    gen: torch.Generator,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centered input and residual directions (n, d) of tokens drawn by (weighted)
    squared error, and the batch mean input (d,)."""
    residual = y - y_hat
    error = residual.pow(2).sum(-1)
    weights = (error if weight is None else error * weight).double().cpu()
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    rows = torch.multinomial(weights, n, replacement=True, generator=gen).to(x.device)
    mean = x.mean(0)
    x_dir = x[rows] - mean
    x_dir = x_dir / x_dir.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    r_dir = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return x_dir, r_dir, mean


def _norm_rows(dead: torch.Tensor) -> torch.Tensor:
    """The rows whose norms new latents take: the live ones, or all when none lives."""
    alive = ~dead
    return alive if bool(alive.any()) else torch.ones_like(dead)


def _reset_activation(
    activation: torch.nn.Module, optimizer: torch.optim.Optimizer, latents: torch.Tensor
) -> None:
    activation.reset_latents_(latents)  # type: ignore[operator]
    for param in activation.parameters():
        if param.requires_grad:
            _reset_moments(optimizer, param, latents)


@torch.no_grad()
def resample_transcoder(
    module: Transcoder,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    dead: torch.Tensor,
    gen: torch.Generator,
    weight: torch.Tensor | None = None,
) -> int:
    """x, y: (N, d) scaled batch; dead: (d_t,) bool; weight: (N,) row weights or None.
    Every dead latent is re-initialized; returns how many."""
    idx = dead.nonzero().squeeze(-1)
    if idx.numel() == 0:
        return 0
    rows = _norm_rows(dead)
    x_dir, r_dir, mean = _choose(x, y, module(x), idx.numel(), gen, weight)
    enc_norm = module.W_enc[rows].norm(dim=-1).mean()
    dec_norm = 1.0 if module.cfg.spec.unit_norm_decoder else module.W_dec[rows].norm(dim=-1).mean()
    module.W_enc[idx] = x_dir * 0.2 * enc_norm
    module.W_dec[idx] = r_dir * dec_norm
    module.b_enc[idx] = -(module.W_enc[idx] @ mean)
    for param in (module.W_enc, module.W_dec, module.b_enc):
        _reset_moments(optimizer, param, idx)
    _reset_activation(module.activation, optimizer, idx)
    return int(idx.numel())


@torch.no_grad()
def resample_clt(
    clt: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    xs: torch.Tensor,
    ys: torch.Tensor,
    dead: torch.Tensor,
    gen: torch.Generator,
    weight: torch.Tensor | None = None,
) -> int:
    """xs, ys: (n_layers, N, d); dead: (n_layers, d_t); weight: (N,) or None. Decoders
    restart at their own layer. Every dead latent is re-initialized; returns how many."""
    estimates = clt(list(xs))
    total = 0
    for s in range(clt.n_layers):
        idx = dead[s].nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        rows = _norm_rows(dead[s])
        x_dir, r_dir, mean = _choose(xs[s], ys[s], estimates[s], idx.numel(), gen, weight)
        enc_norm = clt.W_enc[s][rows].norm(dim=-1).mean()
        dec_norm = 1.0 if clt.cfg.spec.unit_norm_decoder else clt.decoder_norms(s)[rows].mean()
        clt.W_enc[s][idx] = x_dir * 0.2 * enc_norm
        clt.W_dec[s][idx] = 0.0
        clt.W_dec[s][idx, 0] = r_dir * dec_norm
        clt.b_enc[s][idx] = -(clt.W_enc[s][idx] @ mean)
        # W_enc and b_enc hold every source layer: their moments are reset on layer s's rows
        for param in (clt.W_enc, clt.b_enc):
            _reset_moments(optimizer, param, (s, idx))
        _reset_moments(optimizer, clt.W_dec[s], idx)
        _reset_activation(clt.activations[s], optimizer, idx)
        total += int(idx.numel())
    return total
