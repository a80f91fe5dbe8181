"""Modular addition ``a + b = c (mod 113)`` (Nanda et al., ICLR 2023, "Progress measures
for grokking via mechanistic interpretability").

Prompt ``"a + b ="`` with ``a, b`` in ``0..p-1``; answer the single token ``c = (a + b) mod
p``. Nanda et al. train a 1-layer transformer (d_model 128, 4 heads, d_mlp 512) full-batch
with AdamW (lr 1e-3, weight decay 1.0) on 30% of the pairs and see it grok a Fourier
algorithm. The zoo keeps their model size and trains on a larger fraction of pairs with a
higher learning rate so it generalizes within minutes on a CPU; the pairs not trained on
are the held-out set.

On GPT-NeoX the model uses a sequential residual (see ``hf_config_overrides``).

Metrics: held-out accuracy and logit difference between ``c`` and the counterfactual
answer. Counterfactual: the same ``a`` with another ``b`` (so another sum).
"""

import torch

from ingest.zoo.metrics import gather_last, logit_difference, top1_accuracy
from ingest.zoo.task import (
    EncodedBatch,
    ModelShape,
    QualityBar,
    Split,
    Task,
    TaskExample,
    TrainingConfig,
    heldout_mask,
)

SPLIT_SEED = 113


class ModularAddition(Task):
    name = "modular_addition"
    description = "'a + b =' -> (a + b) mod 113"

    def __init__(self, p: int = 113, train_fraction: float = 0.5) -> None:
        if p < 3:
            raise ValueError("p must be at least 3")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError("train_fraction must be in (0, 1)")
        self.p = p
        self.train_fraction = train_fraction

    def config(self) -> dict[str, object]:
        return {"p": self.p, "train_fraction": self.train_fraction}

    def hf_config_overrides(self, arch: str) -> dict[str, object]:
        # With GPT-NeoX's parallel residual, a 1-layer MLP reads only the "=" embedding,
        # never the attention output that carries a and b, so it cannot take part in the
        # algorithm (and training stalled at 88% held-out accuracy). Sequential residual
        # keeps Nanda et al.'s 1-layer attention-then-MLP model.
        return {"use_parallel_residual": False} if arch == "neox" else {}

    def vocabulary(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["+", "="]

    def counterfactual_b(self, a: int, b: int) -> int:
        """Another ``b`` (never ``b`` itself), spread over the residues."""
        offset = 1 + (7 * a + 13 * b) % (self.p - 1)
        return (b + offset) % self.p

    def generate(self, split: Split) -> list[TaskExample]:
        keys = [(a, b) for a in range(self.p) for b in range(self.p)]
        held = heldout_mask(len(keys), 1.0 - self.train_fraction, SPLIT_SEED)
        want_heldout = split == "heldout"
        return [
            self._example(a, b) for (a, b), h in zip(keys, held, strict=True) if h == want_heldout
        ]

    def _example(self, a: int, b: int) -> TaskExample:
        b_cf = self.counterfactual_b(a, b)
        c, c_cf = (a + b) % self.p, (a + b_cf) % self.p
        return TaskExample(
            prompt=f"{a} + {b} =",
            answers=(str(c),),
            wrong_answers=(str(c_cf),),
            counterfactual_prompt=f"{a} + {b_cf} =",
            counterfactual_answers=(str(c_cf),),
            key=(a, b),
        )

    def metrics(self, logits: torch.Tensor, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        last = gather_last(logits, batch.last_index)
        return {
            "accuracy": top1_accuracy(last, batch.answer_ids),
            "logit_diff": logit_difference(last, batch.answer_ids, batch.wrong_ids),
        }

    def default_shape(self) -> ModelShape:
        return ModelShape(d_model=128, n_layers=1, n_heads=4, d_mlp=512, n_ctx=8)

    def default_training(self) -> TrainingConfig:
        return TrainingConfig(steps=1000, batch_size=512, lr=3e-3, weight_decay=1.0)

    def quality_bars(self) -> tuple[QualityBar, ...]:
        return (QualityBar("accuracy", 0.99),)
