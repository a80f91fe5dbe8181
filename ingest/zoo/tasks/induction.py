"""Induction on repeated random token sequences (Olsson et al. 2022, "In-context
Learning and Induction Heads").

A sequence of ``L`` distinct random tokens is followed by the same ``L`` tokens again.
Nothing predicts the first half; an induction head predicts every token of the repeated
half after its first (look back for the current token, copy what followed it). The
model trains on every next-token prediction.

Metric: mean next-token loss on the repeated half over mean loss on the first half, each
without its first token (the first token of either half cannot be predicted by copying);
a model with induction heads drives the ratio toward 0, a unigram model sits at 1.
As a single-answer prompt, an example is the sequence without its last token, whose
answer is that token; the counterfactual repeats a different random sequence, so its
answer differs.

Train and held-out sequences come from different seeds; held-out sequences equal to a
training sequence are dropped.
"""

import random

import torch

from ingest.zoo.metrics import next_token_losses
from ingest.zoo.task import (
    EncodedBatch,
    ModelShape,
    QualityBar,
    Split,
    Task,
    TaskExample,
    TrainingConfig,
)

SEEDS: dict[Split, int] = {"train": 0, "heldout": 1}
COUNTERFACTUAL_SEED_OFFSET = 1000


class Induction(Task):
    name = "induction"
    description = "random tokens x1..xL repeated: predict the repeated half by copying"
    loss_on_all_tokens = True

    def __init__(
        self,
        n_tokens: int = 100,
        half_length: int = 20,
        n_train: int = 20000,
        n_heldout: int = 1000,
    ) -> None:
        if half_length < 3 or half_length > n_tokens:
            raise ValueError("half_length must be in [3, n_tokens]")
        self.n_tokens = n_tokens
        self.half_length = half_length
        self.n_train = n_train
        self.n_heldout = n_heldout

    def config(self) -> dict[str, object]:
        return {
            "n_tokens": self.n_tokens,
            "half_length": self.half_length,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
        }

    def vocabulary(self) -> list[str]:
        return [f"w{i}" for i in range(self.n_tokens)]

    def _sequences(self, seed: int, n: int) -> list[tuple[int, ...]]:
        rng = random.Random(seed)
        return [tuple(rng.sample(range(self.n_tokens), self.half_length)) for _ in range(n)]

    def generate(self, split: Split) -> list[TaskExample]:
        train = self._sequences(SEEDS["train"], self.n_train)
        if split == "train":
            seqs = train
            cf_seqs = self._sequences(SEEDS["train"] + COUNTERFACTUAL_SEED_OFFSET, self.n_train)
        else:
            seen = set(train)
            held = self._sequences(SEEDS["heldout"], self.n_heldout)
            cf_all = self._sequences(SEEDS["heldout"] + COUNTERFACTUAL_SEED_OFFSET, self.n_heldout)
            pairs = [(h, c) for h, c in zip(held, cf_all, strict=True) if h not in seen]
            seqs, cf_seqs = [p[0] for p in pairs], [p[1] for p in pairs]
        return [self._example(s, c) for s, c in zip(seqs, cf_seqs, strict=True)]

    def _example(self, seq: tuple[int, ...], cf: tuple[int, ...]) -> TaskExample:
        if cf[-1] == seq[-1]:
            # The counterfactual must change the answer: swap its first and last tokens
            # (distinct, so the new last token differs from seq's).
            cf = (cf[-1], *cf[1:-1], cf[0])

        def words(s: tuple[int, ...]) -> list[str]:
            return [f"w{i}" for i in s]

        def prompt(s: tuple[int, ...]) -> str:
            return " ".join(words(s) + words(s)[:-1])

        return TaskExample(
            prompt=prompt(seq),
            answers=(f"w{seq[-1]}",),
            wrong_answers=(),
            counterfactual_prompt=prompt(cf),
            counterfactual_answers=(f"w{cf[-1]}",),
            key=seq,
        )

    def eval_text(self, example: TaskExample) -> str:
        return f"{example.prompt} {example.answers[0]}"

    def metrics(self, logits: torch.Tensor, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        # Positions: 0 = <bos>, 1..L first half, L+1..2L repeated half. losses[:, t] is the
        # loss of the token at position t + 1.
        L = self.half_length
        losses = next_token_losses(logits, batch.input_ids)  # (B, T-1)
        first = losses[:, 1:L]  # tokens 2..L
        repeated = losses[:, L + 1 : 2 * L]  # tokens L+2..2L
        top = logits[:, L + 1 : 2 * L].argmax(dim=-1)
        correct = (top == batch.input_ids[:, L + 2 : 2 * L + 1].to(top.device)).float()
        return {
            "first_half_loss": first.mean(dim=1),
            "repeated_half_loss": repeated.mean(dim=1),
            "repeated_accuracy": correct.mean(dim=1),
        }

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "loss_ratio": means["repeated_half_loss"] / means["first_half_loss"]}

    def default_shape(self) -> ModelShape:
        return ModelShape(d_model=64, n_layers=2, n_heads=4, d_mlp=256, n_ctx=48)

    def default_training(self) -> TrainingConfig:
        return TrainingConfig(steps=1000, batch_size=32, lr=1e-3, weight_decay=0.01)

    def tiny_training(self) -> TrainingConfig:
        return TrainingConfig(
            steps=40,
            batch_size=16,
            lr=5e-3,
            weight_decay=0.0,
            warmup_steps=5,
            eval_every=40,
            eval_examples=64,
        )

    def quality_bars(self) -> tuple[QualityBar, ...]:
        # A unigram model, which cannot copy, sits at a loss ratio of 1.
        return (QualityBar("loss_ratio", 0.1, higher=False, baseline=1.0),)
