"""Cross-layer transcoder (CLT; Anthropic 2025, "Circuit Tracing", section 2.1).

A CLT has one encoder per layer; the latents of source layer ``s`` read that layer's MLP
input and write, through one decoder per target, to the MLP outputs of every layer
``t >= s``. The estimate of layer t's MLP output is

    y_hat_t = sum_{s <= t} W_dec[s][:, t - s]^T z_s + b_dec[t] (+ W_skip[t] x_t)

and all encoders and decoders are trained jointly on the sum over layers of the
normalized squared error, plus each source's sparsity penalty. Layers are positions in
the list of covered model layers (``0 .. n_layers - 1`` here; the owning set maps them to
model layers).

Shapes: ``W_enc (n_layers, d_transcoder, d_in)``, ``b_enc (n_layers, d_transcoder)``,
``W_dec[s] (d_transcoder, n_layers - s, d_out)`` (the circuit-tracer layout),
``b_dec (n_layers, d_out)``, ``W_skip (n_layers, d_out, d_in)``.
For architectures with unit-norm decoders, a latent's norm is taken over all its target
decoders together; the ReLU penalty weights by that joint norm.
"""

import torch
from torch import nn

from ingest.transcoders.architectures import Activation, build_activation
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.losses import LossParts, activity, aux_k_dead, aux_k_loss, normalized_mse


class CrossLayerTranscoder(nn.Module):
    """Jointly trained encoders per layer with decoders to every later layer."""

    def __init__(self, cfg: TranscoderConfig, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("a cross-layer transcoder needs at least one layer")
        self.cfg = cfg
        self.n_layers = n_layers
        d_t, d_in, d_out = cfg.d_transcoder, cfg.d_in, cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_t, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_t))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(d_t, n_layers - s, d_out)) for s in range(n_layers)]
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out))
        self.W_skip: nn.Parameter | None = (
            nn.Parameter(torch.zeros(n_layers, d_out, d_in)) if cfg.skip else None
        )
        self.activations = nn.ModuleList([build_activation(cfg) for _ in range(n_layers)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        for s in range(self.n_layers):
            n_targets = self.n_layers - s
            dec = torch.randn(cfg.d_transcoder, n_targets, cfg.d_out, generator=generator)
            norms = dec.pow(2).sum((1, 2), keepdim=True).sqrt()
            target_norm = 1.0 if cfg.spec.unit_norm_decoder else cfg.dec_init_norm
            self.W_dec[s].copy_(dec / norms * target_norm)
            if cfg.d_in == cfg.d_out:
                enc = dec[:, 0, :]
            else:
                enc = torch.randn(cfg.d_transcoder, cfg.d_in, generator=generator)
            enc_norm = cfg.spec.enc_init_norm or cfg.dec_init_norm
            self.W_enc[s].copy_(enc / enc.norm(dim=-1, keepdim=True) * enc_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def init_from_data(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """xs, ys: per layer (N, d). Sets each ``b_dec[t]`` to its target mean and centres
        each encoder on its input mean (``b_enc[s] = -W_enc[s] mean(x_s)``)."""
        for t, y in enumerate(ys):
            self.b_dec[t].copy_(y.mean(0))
        for s, x in enumerate(xs):
            self.b_enc[s].copy_(-(self.W_enc[s] @ x.mean(0)))

    def _activation(self, layer: int) -> Activation:
        return self.activations[layer]  # type: ignore[return-value]

    def threshold(self, layer: int) -> torch.Tensor | None:
        return getattr(self.activations[layer], "threshold", None)

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_transcoder)."""
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_transcoder)."""
        return self.activations[layer](self.pre_activations(layer, x))

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out); zero without a skip connection."""
        if self.W_skip is None:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x @ self.W_skip[layer].T

    def decode_layer(
        self, target: int, acts: list[torch.Tensor], x_target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Estimate of layer ``target``'s output from acts[s] (..., d_t) for s <= target."""
        out = self.b_dec[target]
        for s in range(target + 1):
            out = out + acts[s] @ self.W_dec[s][:, target - s, :]
        if self.W_skip is not None:
            if x_target is None:
                raise ValueError("this transcoder has a skip connection: pass the layer input")
            out = out + self.skip(target, x_target)
        return out

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """xs: per layer (..., d_in) -> per layer (..., d_out)."""
        acts = [self.encode(s, x) for s, x in enumerate(xs)]
        return [self.decode_layer(t, acts, xs[t]) for t in range(self.n_layers)]

    def decoder_norms(self, layer: int) -> torch.Tensor:
        """(d_transcoder,) joint norm of a source latent's decoders over all targets."""
        return self.W_dec[layer].pow(2).sum((1, 2)).sqrt()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        for s in range(self.n_layers):
            norms = self.decoder_norms(s).clamp_min(1e-8)
            self.W_dec[s].div_(norms[:, None, None])

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        for s in range(self.n_layers):
            w = self.W_dec[s]
            if w.grad is None:
                continue
            unit = w / self.decoder_norms(s).clamp_min(1e-8)[:, None, None]
            parallel = (w.grad * unit).sum((1, 2), keepdim=True)
            w.grad.sub_(parallel * unit)

    def loss(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        dead: list[torch.Tensor] | None,
        weight: torch.Tensor | None = None,
    ) -> LossParts:
        """xs, ys: per layer (N, d); dead: per layer (d_transcoder,) bool or None; weight:
        (N,) row weights or None."""
        pres = [self.pre_activations(s, x) for s, x in enumerate(xs)]
        acts = [self._activation(s).train_forward(pre) for s, pre in enumerate(pres)]
        mse = xs[0].new_zeros(())
        sparsity = xs[0].new_zeros(())
        aux = xs[0].new_zeros(())
        for t in range(self.n_layers):
            y_hat = self.decode_layer(t, acts, xs[t])
            mse = mse + normalized_mse(y_hat, ys[t], weight)
            activation = self._activation(t)
            norms = self.decoder_norms(t) if activation.uses_decoder_norms else None
            sparsity = sparsity + activation.penalty(pres[t], acts[t], norms, weight)
            dead_t = aux_k_dead(None if dead is None else dead[t], self.cfg.aux_k_coefficient)
            if dead_t is not None:
                residual = ys[t] - y_hat.detach()
                aux = aux + self.cfg.aux_k_coefficient * aux_k_loss(
                    pres[t],
                    dead_t,
                    residual,
                    self.W_dec[t][:, 0, :],
                    self.cfg.k_aux,
                    self.cfg.aux_k_rows,
                    weight,
                )
        fired, l0 = zip(*(activity(a) for a in acts), strict=True)
        return LossParts(
            mse=mse, sparsity=sparsity, aux=aux, fired=torch.stack(fired), l0=torch.stack(l0).mean()
        )

    @torch.no_grad()
    def fold_scales_(self, in_scales: list[float], out_scales: list[float]) -> None:
        """Make a CLT trained on scaled inputs/targets act on raw activations."""
        for s in range(self.n_layers):
            self.W_enc[s].mul_(in_scales[s])
            for t in range(s, self.n_layers):
                self.W_dec[s][:, t - s, :].div_(out_scales[t])
        for t in range(self.n_layers):
            self.b_dec[t].div_(out_scales[t])
            if self.W_skip is not None:
                self.W_skip[t].mul_(in_scales[t] / out_scales[t])

    def after_step_(self) -> None:
        if self.cfg.spec.unit_norm_decoder:
            self.normalize_decoder_()
        for s in range(self.n_layers):
            act = self._activation(s)
            clamp = getattr(act, "clamp_", None)
            if clamp is not None:
                clamp()
            change = act.take_bias_change()
            if change is not None:
                with torch.no_grad():
                    self.b_enc[s].add_(change)
