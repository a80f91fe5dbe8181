"""Prompt text and single tokens to ids, with errors that name the problem."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ingest.attribution.prompts import single_token_id, tokenize
from ingest.errors import InvalidArgumentError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digits() -> PreTrainedTokenizerFast:
    """Greater-than's kind of vocabulary: two-digit tokens whose text is a number."""
    vocab = {"<unk>": 0, "<eos>": 1} | {f"{i:02d}": i + 2 for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_digit_text_is_the_token_and_ids_need_the_prefix(digits) -> None:
    # "99" is the token "99" (id 101), not the id 99 (the token "97")
    assert single_token_id(digits, "99") == 101
    assert single_token_id(digits, "01") == 3
    assert single_token_id(digits, "id:99") == 99
    assert single_token_id(digits, "<unk>") == 0  # the unknown token named on purpose


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zebra", "not in the vocabulary"),
        ("99 01", "2 tokens"),
        ("", "0 tokens"),
        ("id:x", "id:N"),
        ("id:--5", "id:N"),
        ("id:\u00b2", "id:N"),  # a superscript two is a digit to str.isdigit, not to int
    ],
)
def test_bad_tokens_name_the_problem(digits, text, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        single_token_id(digits, text, "CORRECT")
    assert "CORRECT" in str(info.value)


def test_token_id_prompts_are_one_sequence_of_integers(digits) -> None:
    assert tokenize(digits, [3, 4], 102, 8).tolist() == [[3, 4]]
    assert tokenize(digits, torch.tensor([[3, 4]]), 102, 8).tolist() == [[3, 4]]
    for prompt, message in [
        (torch.tensor([[3, 4], [5, 6]]), r"one prompt.*\(2, 2\)"),  # a batch, not flattened
        ([2.9, 3.7], "integers.*float"),  # not truncated
        (["03", "04"], "integers"),
        ([], "empty"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            tokenize(digits, prompt, 102, 8)


def test_text_with_an_unknown_word_is_refused_even_beside_the_unknown_token(digits) -> None:
    assert tokenize(digits, "03 <unk> 04", 102, 8).tolist() == [[5, 0, 6]]
    with pytest.raises(InvalidArgumentError, match="zebra"):
        tokenize(digits, "03 <unk> zebra", 102, 8)
    with pytest.raises(InvalidArgumentError, match="zebra"):
        tokenize(digits, "03 zebra", 102, 8)
