"""Greater-than over year spans (Hanna, Liu and Variengien, NeurIPS 2023).

Prompt: ``"The {noun} lasted from the year {CC}{YY} to the year {CC}"``; the next token is
a two-digit year ``ZZ`` and a span only makes sense when ``ZZ > YY``. Years tokenize as
two-digit pieces (``"1732"`` -> ``"17" "32"``), as in GPT-2's vocabulary. Training targets
are drawn uniformly from the later years, so a perfect model puts all its mass there.

Metric: probability difference ``P(ZZ > YY) - P(ZZ <= YY)`` over the 100 two-digit year
tokens, averaged over held-out prompts (Hanna et al. report 0.82 for GPT-2 small).
Counterfactual: the same sentence with start year ``YY = 01`` (their "01-dataset"), which
makes almost every year a correct answer.

Examples are keyed by ``(noun, century, YY)`` with ``YY`` in 02..98; a fixed 20% of keys
are held out.
"""

import torch

from ingest.zoo.metrics import gather_last, probability_difference
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

NOUNS = (
    "war", "expedition", "siege", "voyage", "reign", "famine", "drought", "rebellion",
    "dynasty", "occupation", "pilgrimage", "campaign", "crusade", "construction", "trial",
    "blockade", "migration", "plague", "truce", "alliance",
)  # fmt: skip
CENTURIES = tuple(range(11, 18))
START_YEARS = tuple(range(2, 99))
COUNTERFACTUAL_YEAR = 1
TEMPLATE = "The {noun} lasted from the year {cc}{yy:02d} to the year {cc}"
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1729


YEAR_TOKENS = tuple(f"{year:02d}" for year in range(100))


class GreaterThan(Task):
    name = "greater_than"
    description = "'from the year CCYY to the year CC' (CC 11..17) -> a later two-digit year"
    split_digit_pairs = True

    def vocabulary(self) -> list[str]:
        words = ["The", "lasted", "from", "the", "year", "to", *NOUNS]
        return words + list(YEAR_TOKENS)

    def _keys(self) -> list[tuple[int, int, int]]:
        return [
            (n, c, y)
            for n in range(len(NOUNS))
            for c in range(len(CENTURIES))
            for y in range(len(START_YEARS))
        ]

    def generate(self, split: Split) -> list[TaskExample]:
        keys = self._keys()
        held = heldout_mask(len(keys), HELDOUT_FRACTION, SPLIT_SEED)
        want_heldout = split == "heldout"
        return [self._example(*k) for k, h in zip(keys, held, strict=True) if h == want_heldout]

    def _example(self, noun_i: int, century_i: int, year_i: int) -> TaskExample:
        noun, cc, yy = NOUNS[noun_i], CENTURIES[century_i], START_YEARS[year_i]

        def prompt(start: int) -> str:
            return TEMPLATE.format(noun=noun, cc=cc, yy=start)

        return TaskExample(
            prompt=prompt(yy),
            answers=YEAR_TOKENS[yy + 1 :],
            wrong_answers=YEAR_TOKENS[: yy + 1],
            counterfactual_prompt=prompt(COUNTERFACTUAL_YEAR),
            counterfactual_answers=YEAR_TOKENS[COUNTERFACTUAL_YEAR + 1 :],
            key=(noun_i, century_i, year_i),
        )

    def metrics(self, logits: torch.Tensor, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        last = gather_last(logits, batch.last_index)
        return {"prob_diff": probability_difference(last, batch.answer_ids, batch.wrong_ids)}

    def default_shape(self) -> ModelShape:
        return ModelShape(d_model=64, n_layers=2, n_heads=4, d_mlp=256, n_ctx=16)

    def default_training(self) -> TrainingConfig:
        return TrainingConfig(steps=1500, batch_size=64, lr=1e-3, weight_decay=0.01)

    def quality_bars(self) -> tuple[QualityBar, ...]:
        return (QualityBar("prob_diff", 0.8),)
