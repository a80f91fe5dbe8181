"""Prompt text and single tokens to ids, with errors that name the problem."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ingest.attribution.prompts import single_token_id
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
