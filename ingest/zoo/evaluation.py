"""Encoding examples into tensors and measuring a task's metrics on a model.

:func:`encode_examples` right-pads a list of examples into an
:class:`~ingest.zoo.task.EncodedBatch`; :func:`evaluate` runs the model over them in
batches and returns the mean of each per-example metric, plus whatever the task's
``summarize`` derives from those means. The model is any Hugging Face causal LM whose
tokenizer knows the task's words (a zoo checkpoint, or a hub model with a matching
vocabulary).
"""

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ingest.errors import InvalidArgumentError
from ingest.zoo.task import EncodedBatch, Task, TaskExample


def spread_subset(examples: Sequence[TaskExample], n: int) -> list[TaskExample]:
    """``n`` examples spread evenly over ``examples`` (all of them when there are at most
    ``n``), deterministically. A split is ordered by key, so its first ``n`` examples would
    all share the key's leading parts (one noun of greater-than, say)."""
    if n < 0:
        raise InvalidArgumentError(f"cannot take {n} examples: give a count >= 0")
    if len(examples) <= n:
        return list(examples)
    if n == 0:
        return []
    step = len(examples) / n
    return [examples[int(i * step)] for i in range(n)]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def token_ids(
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[str],
    vocab: Mapping[str, int] | None = None,
) -> list[int]:
    """Ids of single-token ``words``; a word missing from the vocabulary is an error.
    Pass ``vocab`` (``tokenizer.get_vocab()``) when calling this in a loop."""
    vocab = vocab if vocab is not None else tokenizer.get_vocab()
    missing = [w for w in words if w not in vocab]
    if missing:
        raise InvalidArgumentError(
            f"the tokenizer has no token for {missing[:5]}: evaluate with the tokenizer the "
            "model was trained with (the checkpoint directory's tokenizer.json)"
        )
    return [vocab[w] for w in words]


def encode_examples(
    task: Task, tokenizer: PreTrainedTokenizerBase, examples: Sequence[TaskExample]
) -> EncodedBatch:
    """Tokenize ``examples`` (their ``task.eval_text``) into a right-padded batch."""
    texts = [task.eval_text(e) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    if texts == [e.prompt for e in examples]:
        prompt_lengths = [len(ids) for ids in encoded]
    else:
        prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
        prompt_lengths = [len(ids) for ids in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = tokenizer.get_vocab()
    return EncodedBatch(
        input_ids=_pad(encoded, pad_id),
        lengths=torch.tensor([len(ids) for ids in encoded], dtype=torch.long),
        last_index=torch.tensor(prompt_lengths, dtype=torch.long) - 1,
        answer_ids=_pad([token_ids(tokenizer, e.answers, vocab) for e in examples], -1),
        wrong_ids=_pad([token_ids(tokenizer, e.wrong_answers, vocab) for e in examples], -1),
    )


@torch.no_grad()
def model_logits(model: PreTrainedModel, batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32) of ``batch``; pads sit after each row's tokens."""
    input_ids = batch.input_ids.to(device)
    positions = torch.arange(input_ids.shape[1], device=device)
    attention_mask = (positions[None, :] < batch.lengths.to(device)[:, None]).long()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[TaskExample],
    *,
    device: torch.device | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean of each task metric over ``examples`` (plus the task's derived summaries)."""
    if not examples:
        raise InvalidArgumentError("no examples to evaluate: pass at least one example")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = encode_examples(task, tokenizer, chunk)
            values = task.metrics(model_logits(model, batch, device), batch)
            for name, per_example in values.items():
                totals[name] = totals.get(name, 0.0) + float(per_example.double().sum())
    finally:
        model.train(was_training)
    means = {name: total / len(examples) for name, total in totals.items()}
    return task.summarize(means)
