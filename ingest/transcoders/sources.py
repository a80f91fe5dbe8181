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

Text and JSONL files are UTF-8 (a leading byte order mark is dropped), read one line at
a time, and no further than ``max_tokens`` needs; a line that is not UTF-8 is an error
that names it.
"""

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
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


def _append(tokens: list[int], tokenizer: Any, text: str) -> None:
    """Append the document ``text``'s tokens to ``tokens``, then EOS when the tokenizer has one."""
    tokens.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        tokens.append(int(eos))


def _stream(texts: Iterable[str], tokenizer: Any, max_tokens: int | None) -> list[int]:
    """Documents tokenized into one stream; ``texts`` is read no further once the stream
    holds ``max_tokens`` tokens."""
    tokens: list[int] = []
    for text in texts:
        if not text:
            continue
        _append(tokens, tokenizer, text)
        if max_tokens is not None and len(tokens) >= max_tokens:
            return tokens[:max_tokens]
    return tokens


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end) of a UTF-8 file, read one line at a time.

    Lines end at LF or CRLF only: ``str.splitlines`` would also break at U+2028, U+2029,
    U+0085 and others, which a JSON string may hold unescaped. A leading byte order mark
    is dropped (``utf-8-sig``). Each line is decoded on its own, so an error names the
    line that is not UTF-8, and lines after the last one read are never decoded.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(
                    f"{path}:{number} is not UTF-8 text (byte {exc.start + 1} of the line, "
                    f"{raw[exc.start : exc.end]!r}): convert the file to UTF-8, for example "
                    f"with iconv -f latin1 -t utf-8"
                ) from exc
            yield number, line.rstrip("\r\n")


#: Characters of one paragraph after which a text source with ``max_tokens`` tokenizes
#: what it has read so far (then again at twice as many, and so on), so that a file
#: without blank lines, one paragraph, is not read whole for a few tokens.
LONG_PARAGRAPH_CHARS = 1 << 16
#: Tokens beyond ``max_tokens`` that a paragraph's first lines must give before the rest
#: is left unread: the last tokens of a cut text can differ from the whole paragraph's
#: (a tokenizer merges across the cut), never the earlier ones.
CUT_MARGIN_TOKENS = 64


def _paragraph_stream(path: Path, tokenizer: Any, max_tokens: int | None) -> list[int]:
    """The stream of a text file's paragraphs (runs of lines up to a blank or
    whitespace-only line), read no further than ``max_tokens`` needs."""
    tokens: list[int] = []
    paragraph: list[str] = []
    chars, check_at = 0, LONG_PARAGRAPH_CHARS
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
            chars += len(line) + 1
            if max_tokens is not None and chars >= check_at:
                text = "\n".join(paragraph).strip()
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(tokens) + len(ids) >= max_tokens + CUT_MARGIN_TOKENS:
                    return (tokens + list(ids))[:max_tokens]
                check_at = 2 * chars
            continue
        if paragraph:
            _append(tokens, tokenizer, "\n".join(paragraph).strip())
            paragraph, chars, check_at = [], 0, LONG_PARAGRAPH_CHARS
            if max_tokens is not None and len(tokens) >= max_tokens:
                return tokens[:max_tokens]
    if paragraph:
        _append(tokens, tokenizer, "\n".join(paragraph).strip())
    return tokens if max_tokens is None else tokens[:max_tokens]


def text_file_source(
    path: Path, tokenizer: Any, context_len: int, max_tokens: int | None = None
) -> StreamSource:
    """Each paragraph of a UTF-8 text file (lines up to a blank or whitespace-only line)
    is one document."""
    if not path.is_file():
        raise NotFoundError(f"text file {path} does not exist")
    return StreamSource(f"text:{path}", _paragraph_stream(path, tokenizer, max_tokens), context_len)


def jsonl_source(
    path: Path, tokenizer: Any, context_len: int, field: str = "text", max_tokens: int | None = None
) -> StreamSource:
    """One JSON object per line of a UTF-8 file; ``field`` holds the document text."""
    if not path.is_file():
        raise NotFoundError(f"JSONL file {path} does not exist")

    def texts() -> Generator[str, None, None]:
        for number, line in _lines(path):
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

    with closing(texts()) as docs:
        tokens = _stream(docs, tokenizer, max_tokens)
    return StreamSource(f"jsonl:{path}", tokens, context_len)


def dataset_texts(
    rows: Iterable[Any], name: str, field: str = "text"
) -> Generator[str, None, None]:
    """The text of each row (a mapping) of dataset ``name``, its string ``field``."""
    for index, row in enumerate(rows):
        text = row.get(field) if isinstance(row, Mapping) else None
        if not isinstance(text, str):
            if not isinstance(row, Mapping):
                found = f"the row is of type {type(row).__name__}"
            else:
                found = "missing" if text is None else f"{field!r} is of type {type(text).__name__}"
            raise InvalidArgumentError(
                f"dataset {name!r} row {index} has no string field {field!r} ({found}): each "
                f"row must hold its text as a string in {field!r}"
            )
        yield text


def _hub_rows(datasets: Any, name: str, config: str | None) -> Iterator[Any]:
    """The rows of a hub dataset's ``train`` split, streamed; a failure to load or to
    fetch a row is an UnavailableError."""

    def unavailable(exc: Exception) -> UnavailableError:
        return UnavailableError(
            f"cannot stream dataset {name!r} from the Hugging Face hub ({exc}): check the "
            f"network and the name, or use a local text/JSONL file"
        )

    try:  # the hub raises many kinds when unreachable
        rows = iter(datasets.load_dataset(name, config, split="train", streaming=True))
    except Exception as exc:
        raise unavailable(exc) from exc
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise unavailable(exc) from exc
        yield row


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
    with closing(dataset_texts(_hub_rows(datasets, name, config), name, field)) as texts:
        tokens = _stream(texts, tokenizer, max_tokens)
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


def jsonl_path_and_field(spec: str) -> tuple[Path, str]:
    """The file and field of ``jsonl:PATH[:FIELD]``'s ``PATH[:FIELD]``.

    A path may hold ':' itself. ``spec`` as a whole names the file when it is one; else
    the field is split off the last ':' when the part before it is a file (any field name,
    ``raw-content`` or ``meta.text`` too) or, for a file not there yet (its error names
    it), when what follows is a Python identifier or nothing (the default ``text``).
    """
    path, colon, field = spec.rpartition(":")
    if Path(spec).is_file() or not colon or not path:
        return Path(spec), "text"
    if Path(path).is_file() or not field or field.isidentifier():
        return Path(path), field or "text"
    return Path(spec), "text"


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
        model_dir = None if model_dir is None else Path(model_dir).expanduser()
        if model_dir is None or not (model_dir / "zoo.json").is_file():
            raise InvalidArgumentError(
                "--prompts zoo needs a zoo model directory (with zoo.json): for other models "
                "pass --prompts text:FILE, jsonl:FILE or hf:DATASET"
            )
        return zoo_source(model_dir, tokenizer)
    kind, _, rest = spec.partition(":")
    if kind == "text" and rest:
        return text_file_source(Path(rest), tokenizer, context_len, max_tokens)
    if kind == "jsonl" and rest:
        path, field = jsonl_path_and_field(rest)
        return jsonl_source(path, tokenizer, context_len, field, max_tokens)
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
