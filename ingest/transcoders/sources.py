"""Prompt sources for activation collection: zoo tasks, text, JSONL, Hugging Face datasets.

A source hands out fixed-width *windows* of token ids by index, deterministically, for a
``train`` and a disjoint ``eval`` split. Indices wrap around, so a training run can ask
for as many windows as it needs; the same index always gives the same tokens, which is
what makes resumed training bit-identical (the buffer re-collects a refill by index).

- :class:`StreamSource`: documents tokenized and concatenated (separated by EOS when the
  tokenizer has one) into one stream cut into windows of ``context_len`` tokens; the last
  ``eval_fraction`` of windows are the eval split (text files, JSONL, HF datasets).
- :class:`PromptSource`: one prompt per window, right-padded, with a mask of real tokens
  (zoo tasks: each prompt followed by its first answer, as the model was trained on it,
  at position 0).

Windows also say which next-token predictions the model was trained to make
(``Windows.scored``): every one for text, only the answer for a zoo task trained on its
answer alone. Cross-entropy metrics count those (a model trained on the answer only
makes arbitrary predictions elsewhere, and zero-ablating an MLP can even lower their
loss, which made CE loss recovered meaningless on such models).

:func:`resolve_source` turns a CLI spec into a source: ``zoo`` (the model directory's
task), ``text:PATH``, ``jsonl:PATH[:FIELD]``, ``hf:NAME[:CONFIG]`` or a path ending in
``.txt`` / ``.jsonl``. ``datasets`` is imported only for ``hf:`` specs.
"""

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]


@dataclass
class Windows:
    """ids: (n, T) long token ids; mask: (n, T) bool, True at real tokens; scored: (n, T)
    bool, True at the tokens whose prediction (from the previous position) the model was
    trained to make."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor


def predicting_positions(mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """mask, scored: (n, T) -> (n, T) bool: the positions t whose next token t + 1 is real
    and scored, i.e. the positions that make a trained prediction."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:] & scored[:, 1:]
    return out


class Source(ABC):
    """Deterministic windows of token ids by index."""

    name: str

    @property
    @abstractmethod
    def width(self) -> int:
        """Tokens per window (T)."""

    @abstractmethod
    def n_windows(self, split: Split) -> int: ...

    @abstractmethod
    def _window(self, split: Split, index: int) -> list[int]: ...

    #: Whether only each window's last token is a trained prediction (zoo tasks trained
    #: on the answer alone); otherwise every real token after the first is.
    answer_only: bool = False

    def pad_id(self) -> int:
        return 0

    def get(self, split: Split, start: int, count: int) -> Windows:
        """Windows ``start .. start + count - 1`` of ``split`` (indices wrap around)."""
        n = self.n_windows(split)
        return self.take(split, [(start + i) % n for i in range(count)])

    def take(self, split: Split, indices: Sequence[int]) -> Windows:
        """The windows of ``split`` at ``indices`` (each in ``0 .. n_windows - 1``), in order."""
        rows = [self._window(split, index) for index in indices]
        count = len(rows)
        width, pad = self.width, self.pad_id()
        # one tensor from padded lists, masks from the lengths: a copy per window cost
        # more than the model forward on short zoo prompts
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
        ids = ids.reshape(count, width)
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)[:, None]
        position = torch.arange(width)[None, :]
        mask = position < lengths
        first = lengths - 1 if self.answer_only else torch.ones_like(lengths)
        scored = mask & (position >= first)
        return Windows(ids=ids, mask=mask, scored=scored)


class StreamSource(Source):
    """One token stream cut into windows of ``context_len``."""

    def __init__(
        self, name: str, tokens: Sequence[int], context_len: int, eval_fraction: float = 0.05
    ) -> None:
        if context_len < 1:
            raise InvalidArgumentError(f"context length must be >= 1, got {context_len}")
        total = len(tokens) // context_len
        if total < 2:
            raise InvalidArgumentError(
                f"source {name!r} has {len(tokens)} tokens, fewer than two windows of "
                f"{context_len}: give more text or a shorter --context-len"
            )
        self.name = name
        self.context_len = context_len
        self._tokens = torch.tensor(list(tokens[: total * context_len]), dtype=torch.long)
        self._n_eval = max(1, round(total * eval_fraction))
        self._n_train = total - self._n_eval

    @property
    def width(self) -> int:
        return self.context_len

    def n_windows(self, split: Split) -> int:
        return self._n_train if split == "train" else self._n_eval

    def _window(self, split: Split, index: int) -> list[int]:
        offset = index if split == "train" else self._n_train + index
        start = offset * self.context_len
        return self._tokens[start : start + self.context_len].tolist()


class PromptSource(Source):
    """One prompt per window, right-padded to the longest prompt."""

    def __init__(
        self,
        name: str,
        train: list[list[int]],
        eval: list[list[int]],
        pad_id: int = 0,
        answer_only: bool = False,
    ) -> None:
        if not train or not eval:
            raise InvalidArgumentError(f"source {name!r} needs train and eval prompts")
        if answer_only and min(len(r) for r in train + eval) < 2:
            raise InvalidArgumentError(
                f"source {name!r} scores only each prompt's last token, so every prompt "
                f"needs at least two tokens"
            )
        self.name = name
        self.answer_only = answer_only
        self._rows = {"train": train, "eval": eval}
        self._width = max(len(r) for r in train + eval)
        self._pad = pad_id

    @property
    def width(self) -> int:
        return self._width

    def pad_id(self) -> int:
        return self._pad

    def n_windows(self, split: Split) -> int:
        return len(self._rows[split])

    def _window(self, split: Split, index: int) -> list[int]:
        return self._rows[split][index]


def _stream(texts: Iterable[str], tokenizer: Any, max_tokens: int | None) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    tokens: list[int] = []
    for text in texts:
        if not text:
            continue
        tokens.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            tokens.append(int(eos))
        if max_tokens is not None and len(tokens) >= max_tokens:
            return tokens[:max_tokens]
    return tokens


def text_file_source(
    path: Path, tokenizer: Any, context_len: int, max_tokens: int | None = None
) -> StreamSource:
    """Each blank-line-separated paragraph of a UTF-8 text file is one document."""
    if not path.is_file():
        raise NotFoundError(f"text file {path} does not exist")
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    return StreamSource(f"text:{path}", _stream(docs, tokenizer, max_tokens), context_len)


def jsonl_source(
    path: Path, tokenizer: Any, context_len: int, field: str = "text", max_tokens: int | None = None
) -> StreamSource:
    """One JSON object per line; ``field`` holds the document text."""
    if not path.is_file():
        raise NotFoundError(f"JSONL file {path} does not exist")

    def texts() -> Iterable[str]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}:{number} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InvalidArgumentError(
                    f"{path}:{number} has no string field {field!r}: each line must be an "
                    f'object like {{"{field}": "..."}}'
                )
            yield record[field]

    return StreamSource(f"jsonl:{path}", _stream(texts(), tokenizer, max_tokens), context_len)


def hf_dataset_source(
    name: str,
    tokenizer: Any,
    context_len: int,
    config: str | None = None,
    field: str = "text",
    max_tokens: int = 1_000_000,
) -> StreamSource:
    """Stream the ``train`` split of a hub dataset until ``max_tokens`` tokens."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UnavailableError(
            "the 'datasets' package is not installed: pip install 'circuitscope[datasets]', "
            "or use a local text/JSONL file as the prompt source"
        ) from exc
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
        texts = (row[field] for row in stream)
        tokens = _stream(texts, tokenizer, max_tokens)
    except KeyError as exc:
        raise InvalidArgumentError(f"dataset {name!r} rows have no field {field!r}") from exc
    except Exception as exc:  # the hub raises many kinds when unreachable
        raise UnavailableError(
            f"cannot stream dataset {name!r} from the Hugging Face hub ({exc}): check the "
            f"network and the name, or use a local text/JSONL file"
        ) from exc
    return StreamSource(f"hf:{name}", tokens, context_len)


#: Seed of the fixed order a zoo source lists its prompts in.
ZOO_ORDER_SEED = 0


def zoo_source(model_dir: Path, tokenizer: Any) -> PromptSource:
    """The training prompts (train split) and held-out prompts (eval) of a zoo model's task,
    each followed by its first answer; only the answer is scored unless the task trains
    on every token (induction).

    Tasks list their examples in generation order (modular addition by the first operand,
    greater-than by noun and year, IOI by name pair), so a prefix would be a narrow slice:
    evaluation's first 1,024 modular-addition prompts held only first operands 0-18 of
    113. Each split is therefore listed in a fixed pseudo-random order (``ZOO_ORDER_SEED``),
    and any prefix (an eval subset, a streamed refill) samples the whole split.
    """
    from ingest.zoo.checkpoint import read_manifest, task_for_spec

    task = task_for_spec(read_manifest(model_dir).spec)

    def text(example: Any) -> str:
        # The first answer is appended so that next-token metrics include the prediction
        # the model was trained for (zoo models are trained on the answer only).
        text = task.eval_text(example)
        if text == example.prompt and example.answers:
            text = f"{text} {example.answers[0]}"
        return text

    def encode(split: Literal["train", "heldout"]) -> list[list[int]]:
        examples = task.examples(split)
        order = torch.randperm(
            len(examples), generator=torch.Generator().manual_seed(ZOO_ORDER_SEED)
        )
        texts = [text(examples[i]) for i in order.tolist()]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PromptSource(
        f"zoo:{task.name}",
        encode("train"),
        encode("heldout"),
        pad,
        answer_only=not task.loss_on_all_tokens,
    )


def resolve_source(
    spec: str | None,
    model_dir: str | Path | None,
    tokenizer: Any,
    context_len: int = 64,
    max_tokens: int | None = None,
) -> Source:
    """The source a CLI spec names (see the module docstring); ``None`` means ``zoo``."""
    spec = spec or "zoo"
    if spec == "zoo":
        if model_dir is None or not (Path(model_dir) / "zoo.json").is_file():
            raise InvalidArgumentError(
                "--prompts zoo needs a zoo model directory (with zoo.json): for other models "
                "pass --prompts text:FILE, jsonl:FILE or hf:DATASET"
            )
        return zoo_source(Path(model_dir), tokenizer)
    kind, _, rest = spec.partition(":")
    if kind == "text" and rest:
        return text_file_source(Path(rest), tokenizer, context_len, max_tokens)
    if kind == "jsonl" and rest:
        path, _, field = rest.partition(":")
        return jsonl_source(Path(path), tokenizer, context_len, field or "text", max_tokens)
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        return hf_dataset_source(
            name, tokenizer, context_len, config or None, max_tokens=max_tokens or 1_000_000
        )
    if spec.endswith(".jsonl"):
        return jsonl_source(Path(spec), tokenizer, context_len, max_tokens=max_tokens)
    if spec.endswith(".txt"):
        return text_file_source(Path(spec), tokenizer, context_len, max_tokens)
    raise InvalidArgumentError(
        f"unknown prompt source {spec!r}: use zoo, text:PATH, jsonl:PATH[:FIELD], "
        f"hf:NAME[:CONFIG], or a .txt/.jsonl path"
    )
