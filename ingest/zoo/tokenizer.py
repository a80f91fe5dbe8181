"""Word-level tokenizers for the zoo's tasks.

Each task gets a closed vocabulary: the special tokens, then the task's words in the
task's order, so token ids are a pure function of the task. Text is split on whitespace
and punctuation (the ``tokenizers`` ``Whitespace`` pre-tokenizer, ``\\w+|[^\\w\\s]+``); tasks
with years split digit runs into two-digit pieces (``"1732"`` -> ``"17" "32"``). Every
encoding starts with ``<bos>``, so position 0 is an attention sink on every prompt.

The result is a :class:`transformers.PreTrainedTokenizerFast`, saved next to the model
by :func:`save_tokenizer`, so ``AutoTokenizer.from_pretrained(directory)`` loads it like
a hub tokenizer under transformers 4.x and 5.x. Decoding joins tokens with single
spaces.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ingest.zoo.task import Task

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
#: The class ``tokenizer_config.json`` names. transformers 5 writes its own
#: ``TokenizersBackend``, which 4.x cannot resolve; both load this one (5.x maps it to
#: the same backend).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def task_vocabulary(task: Task) -> dict[str, int]:
    """Token -> id: special tokens first, then the task's words without duplicates."""
    words = list(dict.fromkeys([*SPECIAL_TOKENS, *task.vocabulary()]))
    return {word: i for i, word in enumerate(words)}


def build_tokenizer(task: Task) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of ``task`` (right padding, ``<bos>`` prepended)."""
    vocab = task_vocabulary(task)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    splitters: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.Whitespace()]
    if task.split_digit_pairs:
        splitters.append(pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
    )
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, naming :data:`TOKENIZER_CLASS` in
    ``tokenizer_config.json`` so that every supported transformers version loads it."""
    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
