"""Turning a user's prompt into token ids, with errors that say what went wrong."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ingest.arguments import TOKEN_ID_PREFIX
from ingest.errors import InvalidArgumentError


def tokenize(
    tokenizer: Any, prompt: str | Sequence[int] | Tensor, vocab_size: int, n_ctx: int
) -> Tensor:
    """The prompt as token ids (1, T).

    ``prompt`` is text (encoded by ``tokenizer``) or token ids: one sequence of
    integers, (T,) or (1, T). Raises InvalidArgumentError for an empty prompt, one longer
    than the context, ids that are not integers or not one sequence, ids outside the
    vocabulary, or text with words the tokenizer maps to its unknown token.
    """
    ids = _encode_text(tokenizer, prompt) if isinstance(prompt, str) else _token_ids(prompt)
    if not ids:
        raise InvalidArgumentError("the prompt is empty after tokenization: give more text")
    if len(ids) > n_ctx:
        raise InvalidArgumentError(
            f"the prompt has {len(ids)} tokens but the model's context is {n_ctx}: shorten it"
        )
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}): use this "
            "model's tokenizer"
        )
    return torch.tensor([ids], dtype=torch.long)


def _encode_text(tokenizer: Any, prompt: str) -> list[int]:
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty: give at least one token of text")
    if tokenizer is None:
        raise InvalidArgumentError("a text prompt needs the model's tokenizer")
    ids = list(tokenizer(prompt)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids:
        return ids
    unk_text = getattr(tokenizer, "unk_token", None) or ""
    # Word by word, with the unknown token's own text taken out: writing it is fine, an
    # unknown word beside it is not.
    words = [
        w
        for w in prompt.split()
        if (rest := w.replace(unk_text, " ") if unk_text else w).strip()
        and unk in tokenizer(rest, add_special_tokens=False)["input_ids"]
    ]
    if words or not (unk_text and unk_text in prompt):
        raise InvalidArgumentError(
            f"the tokenizer cannot encode {words or prompt!r} (mapped to its unknown "
            "token): use words from the model's vocabulary"
        )
    return ids


def _token_ids(prompt: Sequence[int] | Tensor) -> list[int]:
    try:
        ids = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(
            f"token ids must be integers, got {type(prompt).__name__} ({exc}): give text or "
            "a sequence of ints"
        ) from None
    if ids.numel() == 0:
        return []
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidArgumentError(
            f"token ids must be integers, got {ids.dtype}: give a sequence of ints"
        )
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise InvalidArgumentError(
            f"token ids must be one prompt, (T,) or (1, T), got shape {tuple(ids.shape)}: "
            "attribute one prompt at a time"
        )
    return [int(t) for t in ids.tolist()]


def single_token_id(tokenizer: Any, text: str, what: str = "token") -> int:
    """One token of the vocabulary: ``text`` encoded, or ``id:N`` for the id N.

    Text is always text: ``99`` is the token "99", never the id 99. Raises
    InvalidArgumentError when the text is several tokens, none, or a word the tokenizer
    maps to its unknown token. An ``id:N`` is checked against the vocabulary where it is
    used.
    """
    if text.startswith(TOKEN_ID_PREFIX):
        number = text[len(TOKEN_ID_PREFIX) :]
        if not re.fullmatch(r"-?[0-9]+", number):
            raise InvalidArgumentError(f"{what} {text!r}: write a token id as id:N, e.g. id:42")
        return int(number)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InvalidArgumentError(
            f"{what} {text!r} is {len(ids)} tokens, not one: give a single token of the "
            f"vocabulary, or its id as id:N"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text != getattr(tokenizer, "unk_token", None):
        raise InvalidArgumentError(
            f"{what} {text!r} is not in the vocabulary (the tokenizer maps it to its unknown "
            f"token): give a token of the vocabulary, or its id as id:N"
        )
    return int(ids[0])
