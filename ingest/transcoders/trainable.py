"""The modules one training run trains, behind one interface: per-layer transcoders or
SAEs side by side, or one cross-layer transcoder (:class:`Trainable`); its loss compiled
whole for ``--compile`` (:func:`compiled_loss`); and the periodic evaluation of the
modules as they would be exported (:func:`quick_eval`). The loop around them is
:mod:`ingest.transcoders.trainer`'s."""

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import TrainConfig, TranscoderConfig
from ingest.transcoders.losses import LossParts, normalized_mse
from ingest.transcoders.resampling import resample_clt, resample_transcoder
from ingest.transcoders.transcoder import Transcoder

logger = logging.getLogger(__name__)


class Trainable(nn.Module):
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
        static: bool = False,
    ) -> LossParts:
        """x, y: (n_layers, B, d); dead: (n_layers, d_t) bool or None; weight: (B,) or None;
        static: per-layer modules' AuxK in fixed shapes (a compiled step)."""
        if self.clt is not None:
            return self.clt.loss(list(x), list(y), None if dead is None else list(dead), weight)
        parts = [
            m.loss(x[i], y[i], None if dead is None else dead[i], weight, static=static)  # type: ignore[operator]
            for i, m in enumerate(self.per_layer)
        ]
        return LossParts(
            mse=torch.stack([p.mse for p in parts]).sum(),
            sparsity=torch.stack([p.sparsity for p in parts]).sum(),
            aux=torch.stack([p.aux for p in parts]).sum(),
            fired=torch.stack([p.fired for p in parts]),
            l0=torch.stack([p.l0 for p in parts]).mean(),
        )

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (n_layers, B, d) -> the modules as they would be exported: activations
        (n_layers, B, d_t) and estimates (n_layers, B, d) (BatchTopK at its threshold)."""
        if self.clt is not None:
            xs = list(x)
            acts = [self.clt.encode(s, x_s) for s, x_s in enumerate(xs)]
            estimates = [self.clt.decode_layer(t, acts, xs[t]) for t in range(len(xs))]
            return torch.stack(acts), torch.stack(estimates)
        per_layer = [(m.encode(x[i]), x[i]) for i, m in enumerate(self.per_layer)]  # type: ignore[operator]
        estimates = [
            m.decode(acts, x_i)  # type: ignore[operator]
            for m, (acts, x_i) in zip(self.per_layer, per_layer, strict=True)
        ]
        return torch.stack([acts for acts, _ in per_layer]), torch.stack(estimates)

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
        """x, y: (n_layers, B, d) scaled batch; dead: (n_layers, d_t) bool; weight: (B,).
        Every dead latent is re-initialized; returns how many."""
        if self.clt is not None:
            return resample_clt(self.clt, optimizer, x, y, dead, gen, weight)
        total = 0
        for i, module in enumerate(self.per_layer):
            assert isinstance(module, Transcoder)
            total += resample_transcoder(module, optimizer, x[i], y[i], dead[i], gen, weight)
        return total


def compiled_loss(trainable: Trainable, device: torch.device) -> Any:
    """``trainable.loss`` in fixed shapes, compiled whole (``fullgraph``: a graph break,
    and with it a host sync on CUDA, is an error); on CUDA as CUDA graphs."""
    logger.info("compiling the training step: the first step takes longer")
    mode = "reduce-overhead" if device.type == "cuda" else None

    def loss(
        x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor, weight: torch.Tensor | None
    ) -> LossParts:
        return trainable.loss(x, y, dead, weight, static=True)

    return torch.compile(loss, fullgraph=True, mode=mode)


@torch.no_grad()
def quick_eval(
    trainable: Trainable,
    x: torch.Tensor,
    y: torch.Tensor,
    since_fired: torch.Tensor,
    cfg: TrainConfig,
) -> dict[str, float]:
    """FVU, L0 and dead fraction on the fixed eval activations (scaled units), of the
    modules as they would be exported now: BatchTopK at its running threshold, not its
    batch selection (whose L0 is k by construction). The last evaluation comes before
    the threshold's calibration after the last step."""
    acts, estimates = trainable.infer(x)
    n_layers = x.shape[0]
    fired = (acts > 0).any(1)
    return {
        "fvu": sum(float(normalized_mse(estimates[i], y[i])) for i in range(n_layers)) / n_layers,
        "l0": float((acts > 0).sum(-1).float().mean()),
        "dead_fraction_eval": float(fired.logical_not().float().mean()),
        "dead_fraction_train": float((since_fired >= cfg.dead_after_tokens).float().mean()),
    }
