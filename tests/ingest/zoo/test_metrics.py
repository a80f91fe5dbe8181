"""Metrics on hand-built logits give the values worked out by hand."""

import math

import pytest
import torch

from ingest.zoo.evaluation import encode_examples
from ingest.zoo.metrics import (
    logit_difference,
    next_token_losses,
    probability_difference,
    top1_accuracy,
)
from ingest.zoo.tasks import TASKS, Induction
from ingest.zoo.tokenizer import build_tokenizer


@pytest.mark.unit
def test_probability_difference_on_known_distributions() -> None:
    # Vocabulary of 4; answers {2, 3}, wrong {0}; token 1 is neither.
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    answers = torch.tensor([[2, 3], [2, -1]])
    wrong = torch.tensor([[0, -1], [0, 1]])
    diff = probability_difference(logits, answers, wrong)
    torch.testing.assert_close(diff, torch.tensor([0.7 - 0.1, 0.25 - 0.5]))


@pytest.mark.unit
def test_logit_difference_and_accuracy() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, -1.0]])
    answers = torch.tensor([[1], [1]])
    wrong = torch.tensor([[2], [0]])
    torch.testing.assert_close(logit_difference(logits, answers, wrong), torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(top1_accuracy(logits, answers), torch.tensor([1.0, 0.0]))
    # Several answers: the mean of their logits.
    torch.testing.assert_close(
        logit_difference(logits, torch.tensor([[1, 2], [0, -1]]), torch.tensor([[0], [2]])),
        torch.tensor([2.5, 4.0]),
    )


@pytest.mark.unit
def test_next_token_losses_are_negative_log_probabilities() -> None:
    probs = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]])  # (1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    losses = next_token_losses(probs.log(), ids)
    torch.testing.assert_close(losses, torch.tensor([[-math.log(0.5), -math.log(0.9)]]))


@pytest.mark.unit
def test_greater_than_metric_through_the_task() -> None:
    task = TASKS.get("greater_than")
    tokenizer = build_tokenizer(task)
    examples = task.examples("heldout")[:3]
    batch = encode_examples(task, tokenizer, examples)
    vocab = tokenizer.get_vocab()
    V = len(tokenizer)
    logits = torch.full((3, batch.input_ids.shape[1], V), -1e9)
    # Row 0: all mass on year 99 (always later): +1. Row 1: all on year 00: -1.
    # Row 2: half on 99, half on 00: 0.
    logits[0, batch.last_index[0], vocab["99"]] = 0.0
    logits[1, batch.last_index[1], vocab["00"]] = 0.0
    logits[2, batch.last_index[2], vocab["99"]] = 0.0
    logits[2, batch.last_index[2], vocab["00"]] = 0.0
    values = task.metrics(logits, batch)["prob_diff"]
    torch.testing.assert_close(values, torch.tensor([1.0, -1.0, 0.0]))


@pytest.mark.unit
def test_induction_metric_on_a_perfect_copier() -> None:
    task = Induction(n_tokens=30, half_length=6, n_train=50, n_heldout=10)
    tokenizer = build_tokenizer(task)
    examples = task.examples("heldout")
    batch = encode_examples(task, tokenizer, examples)
    B, T = batch.input_ids.shape
    assert T == 1 + 2 * 6
    # Uniform everywhere except a confident correct prediction on the repeated half.
    logits = torch.zeros(B, T, len(tokenizer))
    for pos in range(7, T - 1):
        logits[torch.arange(B), pos, batch.input_ids[:, pos + 1]] = 100.0
    values = {k: float(v.mean()) for k, v in task.metrics(logits, batch).items()}
    summary = task.summarize(values)
    assert summary["first_half_loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-5)
    assert summary["repeated_half_loss"] < 1e-6
    assert summary["repeated_accuracy"] == 1.0
    assert summary["loss_ratio"] < 1e-6
