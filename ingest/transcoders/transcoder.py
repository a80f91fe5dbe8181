"""The per-layer transcoder module (and, trained output = input, the SAE baseline).

``pre = W_enc (x - b_pre) + b_enc``, ``z = act(pre)``, ``y_hat = W_dec^T z + b_dec
(+ W_skip x)`` (Dunefsky et al. 2024; skip transcoders: Paulo et al. 2025). ``b_pre`` is
folded into ``b_enc`` (``b_enc <- b_enc - W_enc b_pre``), as in circuit-tracer, so it is
always zero here and files carry no separate input bias.

Shapes: ``W_enc (d_transcoder, d_in)``, ``b_enc (d_transcoder,)``, ``W_dec (d_transcoder,
d_out)`` (row i is latent i's write direction), ``b_dec (d_out,)``, ``W_skip (d_out,
d_in)`` (used as ``x @ W_skip.T``), ``threshold (d_transcoder,)`` for JumpReLU.

Initialization follows the literature: decoder rows random with norm ``dec_init_norm``
(unit norm for architectures that keep unit-norm decoders), the encoder is the decoder
transposed when ``d_in == d_out`` (Gao et al. 2024; sparsify), with rows of norm
``spec.enc_init_norm`` (TopK: 1, the exact transpose of the unit decoder; others
``dec_init_norm``), ``W_skip`` starts at zero. :meth:`init_from_data` sets ``b_dec`` to
the target mean and centres the encoder on the input mean, ``b_enc = -W_enc mean(x)``
(the ``b_pre = mean`` of SAELens, folded into ``b_enc``): zoo MLP inputs carry 20-60% of
their energy in their mean, and an uncentred encoder lets the few latents aligned with
the mean win every TopK selection from the first step.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ingest.transcoders.architectures import Activation, SelectingActivation, build_activation
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.losses import (
    LossParts,
    activity,
    aux_k_dead,
    aux_k_loss,
    aux_k_row_count,
    normalized_mse,
    static_aux_k_loss,
)
from ingest.transcoders.sparse import sparse_forward


class Transcoder(nn.Module):
    """One sparse replacement of one MLP (or, as an SAE, of its output)."""

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_transcoder, cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_transcoder))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_transcoder, cfg.d_out))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.W_skip: nn.Parameter | None = (
            nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in)) if cfg.skip else None
        )
        self.activation: Activation = build_activation(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        dec = torch.randn(cfg.d_transcoder, cfg.d_out, generator=generator)
        dec_norm = 1.0 if cfg.spec.unit_norm_decoder else cfg.dec_init_norm
        dec = dec / dec.norm(dim=-1, keepdim=True) * dec_norm
        self.W_dec.copy_(dec)
        enc_norm = cfg.spec.enc_init_norm or cfg.dec_init_norm
        if cfg.d_in == cfg.d_out:
            enc = dec
        else:
            enc = torch.randn(cfg.d_transcoder, cfg.d_in, generator=generator)
        self.W_enc.copy_(enc / enc.norm(dim=-1, keepdim=True) * enc_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (N, d_in), y: (N, d_out). ``b_dec`` = target mean, encoder centred on x."""
        self.b_dec.copy_(y.mean(0))
        self.b_enc.copy_(-(self.W_enc @ x.mean(0)))

    @property
    def threshold(self) -> torch.Tensor | None:
        """(d_transcoder,) thresholds of inference's JumpReLU (JumpReLU's learned ones,
        BatchTopK's fitted one), or None for other architectures."""
        return getattr(self.activation, "threshold", None)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_transcoder)."""
        return F.linear(x, self.W_enc, self.b_enc)  # one fused addmm, not a matmul and an add

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> activations (..., d_transcoder)."""
        return self.activation(self.pre_activations(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out); zero when there is no skip connection."""
        if self.W_skip is None:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x @ self.W_skip.T

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """acts: (..., d_transcoder), x: (..., d_in) needed with a skip -> (..., d_out)."""
        out = F.linear(acts, self.W_dec.T, self.b_dec)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: pass its input x")
            out = out + self.skip(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> y_hat (..., d_out)."""
        return self.decode(self.encode(x), x)

    def decoder_norms(self) -> torch.Tensor:
        """(d_transcoder,) norm of each latent's decoder row."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (architectures that keep unit norm)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each unit decoder row (sparsify)."""
        if self.W_dec.grad is None:
            return
        dec = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * dec).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * dec)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        *,
        static: bool = False,
    ) -> LossParts:
        """x: (N, d_in), y: (N, d_out), dead: (d_transcoder,) bool or None, weight: (N,)
        row weights or None (every row counts once).

        TopK and BatchTopK run the sparse step (:mod:`ingest.transcoders.sparse`), every
        other architecture :meth:`dense_loss`; both compute the same terms. ``static``:
        AuxK in fixed shapes (:func:`~ingest.transcoders.losses.static_aux_k_loss`), for a
        compiled step.
        """
        if isinstance(self.activation, SelectingActivation):
            return self._sparse_loss(x, y, dead, weight, static)
        return self.dense_loss(x, y, dead, weight, static=static)

    def dense_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        *,
        static: bool = False,
    ) -> LossParts:
        """The loss through the dense (N, d_transcoder) activations, AuxK when a latent
        is ``dead``: the formulation of every architecture, and the sparse step's reference."""
        pre = self.pre_activations(x)
        acts = self.activation.train_forward(pre)
        y_hat = self.decode(acts, x)
        mse = normalized_mse(y_hat, y, weight)
        norms = self.decoder_norms() if self.activation.uses_decoder_norms else None
        sparsity = self.activation.penalty(pre, acts, norms, weight)
        aux = pre.new_zeros(())
        if static:
            aux = self._static_aux(x, y - y_hat.detach(), dead, weight, pre)
        elif (dead := aux_k_dead(dead, self.cfg.aux_k_coefficient)) is not None:
            aux = self.cfg.aux_k_coefficient * aux_k_loss(
                pre,
                dead,
                y - y_hat.detach(),
                self.W_dec,
                self.cfg.k_aux,
                self.cfg.aux_k_rows,
                weight,
            )
        fired, l0 = activity(acts)
        return LossParts(mse=mse, sparsity=sparsity, aux=aux, fired=fired, l0=l0)

    def _static_aux(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        dead: torch.Tensor | None,
        weight: torch.Tensor | None,
        pre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AuxK in fixed shapes on the first ``aux_k_rows`` rows (0: all) of the batch
        ``x`` and its ``residual``; zero without ``dead`` or an AuxK weight. ``pre``: the
        batch's pre-activations with their gradient, when the caller has them (the sparse
        step computes its own without one, so its rows are computed again here)."""
        if dead is None or self.cfg.aux_k_coefficient <= 0:
            return x.new_zeros(())
        rows = self.cfg.aux_k_rows or x.shape[0]
        return self.cfg.aux_k_coefficient * static_aux_k_loss(
            self.pre_activations(x[:rows]) if pre is None else pre[:rows],
            dead,
            residual[:rows],
            self.W_dec,
            self.cfg.k_aux,
            None if weight is None else weight[:rows],
        )

    def _sparse_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        dead: torch.Tensor | None,
        weight: torch.Tensor | None,
        static: bool = False,
    ) -> LossParts:
        """The same terms as the dense path, from the selected latents (see ``sparse``)."""
        # the dynamic AuxK inside the sparse step, or the static one after it
        aux_dead = None if static else aux_k_dead(dead, self.cfg.aux_k_coefficient)
        aux_columns = None if aux_dead is None else aux_dead.nonzero().squeeze(1)
        aux_rows = aux_k_row_count(
            self.cfg.aux_k_rows,
            0 if aux_columns is None else int(aux_columns.numel()),
            self.cfg.d_transcoder,
            x.shape[0],
        )
        assert isinstance(self.activation, SelectingActivation)
        decoded, estimate, chosen, values = sparse_forward(
            x,
            self.W_enc,
            self.b_enc,
            self.W_dec,
            self.activation.select,
            aux_columns,
            self.cfg.k_aux,
            aux_rows,
        )
        y_hat = decoded + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + self.skip(x)
        mse = normalized_mse(y_hat, y, weight)
        aux = mse.new_zeros(())
        if static:
            aux = self._static_aux(x, y - y_hat.detach(), dead, weight)
        elif aux_columns is not None:
            rows = estimate.shape[0]
            residual = (y - y_hat.detach())[:rows]
            aux_weight = None if weight is None else weight[:rows]
            aux = self.cfg.aux_k_coefficient * normalized_mse(estimate, residual, aux_weight)
        with torch.no_grad():
            # values are >= 0: a latent fired when the values it received sum above zero
            totals = values.new_zeros(self.cfg.d_transcoder)
            fired = totals.index_add_(0, chosen.columns, values) > 0
            l0 = (values > 0).sum() / x.shape[0]
        return LossParts(mse=mse, sparsity=mse.new_zeros(()), aux=aux, fired=fired, l0=l0)

    @torch.no_grad()
    def fold_scales_(self, in_scale: float, out_scale: float) -> None:
        """Make a module trained on ``x * in_scale -> y * out_scale`` act on raw x, y."""
        self.W_enc.mul_(in_scale)
        self.W_dec.div_(out_scale)
        self.b_dec.div_(out_scale)
        if self.W_skip is not None:
            self.W_skip.mul_(in_scale / out_scale)

    def after_step_(self) -> None:
        """Constraints restored after every optimizer step, and the activation's encoder
        bias change (BatchTopK's firing floor) applied."""
        if self.cfg.spec.unit_norm_decoder:
            self.normalize_decoder_()
        clamp = getattr(self.activation, "clamp_", None)
        if clamp is not None:
            clamp()
        change = self.activation.take_bias_change()
        if change is not None:
            with torch.no_grad():
                self.b_enc.add_(change)
