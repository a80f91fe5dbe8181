"""End-to-end training: the KL divergence of the model with its MLPs replaced.

Reconstruction alone weighs every direction of an MLP's output by its variance, whatever
the rest of the model makes of it; end-to-end training (Braun et al. 2024, "Identifying
functionally important features with end-to-end sparse dictionary learning") weighs it by
its effect on the next-token distribution. A run with ``kl_steps`` > 0
(:class:`~ingest.transcoders.config.TrainConfig`) takes that many steps after its
``steps`` reconstruction steps, each minimizing

    reconstruction loss (as before) + kl_coefficient * KL(p_model || p_replaced)

where ``p_replaced`` is the model with every covered MLP replaced by the modules as they
run at inference (BatchTopK at its threshold), all layers at once: the replacement model
that attribution and the all-layers metrics use. Keeping the reconstruction terms keeps
each layer's output a reconstruction of that layer (Braun et al.'s "e2e + downstream"
variant adds terms that keep the later layers' activations on the model's own, to the
same end). Transcoders, SAEs
and CLTs are trained the same way, so the comparison of kinds stays fair.

The KL is averaged over the positions the eval's KL counts (every next-token prediction
of a text window; the answer of a zoo prompt) of ``kl_batch`` training windows drawn at
random by (seed, step), so a resumed run draws the same windows. The modules train in
the trainer's scaled units; the replacements here scale their input and unscale their
output.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ingest.transcoders.evaluation import kl_rows, module_replacements
from ingest.transcoders.sources import Source, predicting_positions

#: Added to the seed of the generator that draws an end-to-end step's windows, so that its
#: stream differs from the resampler's (seeded by seed and step as well).
_WINDOW_STREAM = 7_919


@dataclass
class EndToEndLoss:
    """The KL term of an end-to-end step, for the modules being trained.

    ``per_layer``: the per-layer modules by position in ``layers`` (transcoders or SAEs),
    or ``clt``: one cross-layer transcoder; ``in_scales`` / ``out_scales``: the trainer's
    per-layer activation scales (the modules map scaled inputs to scaled outputs);
    ``batch``: training windows per step.
    """

    adapter: Any
    source: Source
    layers: list[int]
    kind: str
    per_layer: list[Any]
    clt: Any
    in_scales: list[float]
    out_scales: list[float]
    batch: int
    seed: int

    @property
    def n_train(self) -> int:
        return self.source.n_windows("train")

    def indices(self, step: int) -> list[int]:
        """The training windows of end-to-end step ``step`` (a function of seed and step)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + _WINDOW_STREAM + step)
        return torch.randint(self.n_train, (self.batch,), generator=gen).tolist()

    def __call__(self, step: int) -> torch.Tensor:
        """Mean KL(p_model || p_replaced) over the counted positions of step ``step``'s
        windows; differentiable in the modules' parameters (the model's own parameters
        need no gradient: backpropagate with ``inputs=`` the modules' parameters)."""
        windows = self.source.take("train", self.indices(step))
        device = self.adapter.device
        ids = windows.ids.to(device)
        keep = predicting_positions(windows.mask, windows.scored).to(device)
        if not bool(keep.any()):
            return torch.zeros((), device=device)
        with torch.no_grad():
            clean = F.log_softmax(self.adapter(ids)[keep], -1)
        replacements = module_replacements(
            self.adapter, self.kind, self.layers, self.per_layer, self.clt, self.in_scales,
            self.out_scales,
        )  # fmt: skip
        replaced = F.log_softmax(self.adapter(ids, mlp_replacements=replacements)[keep], -1)
        return kl_rows(clean, replaced).mean()
