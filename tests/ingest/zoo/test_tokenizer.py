import json

import pytest
from transformers import AutoTokenizer

from ingest.zoo.tasks import TASKS
from ingest.zoo.tokenizer import (
    BOS,
    SPECIAL_TOKENS,
    TOKENIZER_CLASS,
    UNK,
    build_tokenizer,
    save_tokenizer,
    task_vocabulary,
)


@pytest.mark.unit
@pytest.mark.parametrize("name", TASKS.names())
def test_tokenizer_splits_prompts_into_vocabulary_words(name: str, tmp_path) -> None:
    task = TASKS.get(name)
    tokenizer = build_tokenizer(task)
    vocab = task_vocabulary(task)
    assert list(vocab)[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert len(tokenizer) == len(vocab)
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "right" and len(loaded) == len(vocab)
    for ex in task.examples("heldout")[:20]:
        ids = tokenizer(ex.prompt)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens[0] == BOS and UNK not in tokens
        assert loaded(ex.prompt)["input_ids"] == ids
        assert loaded(loaded.decode(ids, skip_special_tokens=True))["input_ids"] == ids
        # Decoding joins the words with spaces.
        assert tokenizer.decode(ids, skip_special_tokens=True).split() == tokens[1:]


@pytest.mark.unit
def test_years_split_into_two_digit_tokens() -> None:
    tokenizer = build_tokenizer(TASKS.get("greater_than"))
    ids = tokenizer("from the year 1732 to the year 17")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[1:] == [
        "from", "the", "year", "17", "32", "to", "the", "year", "17",
    ]  # fmt: skip
