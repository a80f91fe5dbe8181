"""Indirect object identification (Wang et al., ICLR 2023, "Interpretability in the Wild").

Prompts follow the IOI templates: two names are introduced, one of them (the subject S)
is repeated, and the sentence ends where the other (the indirect object IO) must follow:
``"When Mary and John went to the store, John gave a drink to"`` -> ``"Mary"``. Both orders
of the introduction (ABBA and BABA) and several templates are used, so neither position
nor template gives the answer away: the model has to find the name that is not repeated.

Metrics: logit difference ``logit(IO) - logit(S)`` (Wang et al. report 3.55 for GPT-2
small) and accuracy (the arg-max token is IO). Counterfactual: the IO's mention replaced
by a third name C, so the answer becomes C.

Examples are keyed by ``(template, io, s, order, place, object, third)``; a fixed 20% of
the unordered name pairs are held out, so held-out prompts pair names never seen
together. Each pair's 40 examples are drawn at random (seeded by the pair), with
replacement: a key can repeat within a split (2 keys in train, 3 held out), and a
prompt more often (its counterfactual's third name differing). The repeats are kept:
drawing them again would change every later example, and with it the data that
trained checkpoints and recorded results were made from.
"""

import random

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

NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "Tom", "Emma", "James", "Laura", "David",
    "Anna", "Paul", "Kate", "Mark", "Lisa", "Peter", "Rose", "Daniel", "Julia", "Adam",
    "Grace", "Henry", "Clara", "Oscar", "Ella", "Simon", "Lucy", "Victor", "Nora", "Hugo",
)  # fmt: skip
PLACES = (
    "store", "park", "school", "garden", "restaurant", "office", "beach", "station",
    "library", "market",
)  # fmt: skip
OBJECTS = (
    "drink", "book", "ball", "gift", "letter", "key", "flower", "ring", "snack", "card",
)  # fmt: skip
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} passed a {obj} to",
    "Friends {A} and {B} found a {obj} at the {place}. {S} gave it to",
)
EXAMPLES_PER_PAIR = 40
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 2023


class IOI(Task):
    name = "ioi"
    description = "'When Mary and John went to the store, John gave a drink to' -> Mary"
    unique_keys = False  # random draws per name pair, repeats kept (see the module doc)

    def vocabulary(self) -> list[str]:
        words: list[str] = []
        for template in TEMPLATES:
            text = template.format(A="", B="", S="", place="", obj="")
            words += text.replace(",", " , ").replace(".", " . ").split()
        words += [*NAMES, *PLACES, *OBJECTS]
        return list(dict.fromkeys(words))

    def generate(self, split: Split) -> list[TaskExample]:
        pairs = [(i, j) for i in range(len(NAMES)) for j in range(i + 1, len(NAMES))]
        held = heldout_mask(len(pairs), HELDOUT_FRACTION, SPLIT_SEED)
        want_heldout = split == "heldout"
        out: list[TaskExample] = []
        for (i, j), h in zip(pairs, held, strict=True):
            if h != want_heldout:
                continue
            rng = random.Random(i * len(NAMES) + j)
            for n in range(EXAMPLES_PER_PAIR):
                io, s = (i, j) if n % 2 == 0 else (j, i)
                key = (
                    rng.randrange(len(TEMPLATES)),
                    io,
                    s,
                    rng.randrange(2),
                    rng.randrange(len(PLACES)),
                    rng.randrange(len(OBJECTS)),
                    rng.choice([c for c in range(len(NAMES)) if c not in (io, s)]),
                )
                out.append(self._example(*key))
        return out

    def _example(
        self, template: int, io: int, s: int, order: int, place: int, obj: int, third: int
    ) -> TaskExample:
        def prompt(io_name: str) -> str:
            a, b = (io_name, NAMES[s]) if order == 0 else (NAMES[s], io_name)
            return TEMPLATES[template].format(
                A=a, B=b, S=NAMES[s], place=PLACES[place], obj=OBJECTS[obj]
            )

        return TaskExample(
            prompt=prompt(NAMES[io]),
            answers=(NAMES[io],),
            wrong_answers=(NAMES[s],),
            counterfactual_prompt=prompt(NAMES[third]),
            counterfactual_answers=(NAMES[third],),
            key=(template, io, s, order, place, obj, third),
        )

    def metrics(self, logits: torch.Tensor, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        last = gather_last(logits, batch.last_index)
        return {
            "logit_diff": logit_difference(last, batch.answer_ids, batch.wrong_ids),
            "accuracy": top1_accuracy(last, batch.answer_ids),
        }

    def default_shape(self) -> ModelShape:
        # Three layers: duplicate-token, S-inhibition and name-mover stages (Wang et al.);
        # with two, training sat at chance between the two names for 3000 steps.
        return ModelShape(d_model=64, n_layers=3, n_heads=4, d_mlp=256, n_ctx=24)

    def default_training(self) -> TrainingConfig:
        return TrainingConfig(steps=1200, batch_size=128, lr=3e-3, weight_decay=0.01)

    def quality_bars(self) -> tuple[QualityBar, ...]:
        return (QualityBar("logit_diff", 3.0), QualityBar("accuracy", 0.95))
