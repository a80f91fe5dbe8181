"""Text, JSONL and dataset-row prompt sources on real files: line breaks, byte order
marks, reading no further than --max-tokens, encoding errors, field checks, paths with ':'."""

import json
import random
from pathlib import Path

import pytest

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.sources import (
    LONG_PARAGRAPH_CHARS,
    dataset_texts,
    jsonl_path_and_field,
    resolve_source,
)
from tests.ingest.transcoders.helpers import word_tokenizer

pytestmark = pytest.mark.unit

WORDS = [f"w{i % 30 + 2}" for i in range(400)]


def _tokens(source) -> list[int]:
    """The whole stream of a source (train then eval windows)."""
    return source._tokens.tolist()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    tok = word_tokenizer()
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: valid JSON lines
    texts = [f"w2 w3{sep}w4 w5" for sep in ("\u2028", "\u2029", "\x85")] * 4
    path = tmp_path / "seps.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8"
    )
    assert "\u2028" in path.read_text(encoding="utf-8")
    source = resolve_source(f"jsonl:{path}", None, tok, context_len=5)
    assert _tokens(source) == [t for text in texts for t in [*_ids(tok, text), 1]][:60]


def test_a_byte_order_mark_is_dropped(tmp_path):
    tok = word_tokenizer()
    text = " ".join(WORDS)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": text}) for _ in range(2)).encode()
    )
    plain = _ids(tok, text)
    assert _tokens(resolve_source(str(tmp_path / "bom.txt"), None, tok, 16)) == plain
    jsonl = resolve_source(str(tmp_path / "bom.jsonl"), None, tok, 16)
    assert _tokens(jsonl)[: len(plain)] == plain


def test_crlf_lines_and_whitespace_only_lines_between_paragraphs(tmp_path):
    tok = word_tokenizer()
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"w2 w3\r\nw4\r\n \t\r\nw5 w6\r\n\r\n\r\nw7 w8\n")
    source = resolve_source(f"text:{path}", None, tok, context_len=2)
    # paragraphs "w2 w3\nw4", "w5 w6", "w7 w8", each followed by EOS (1)
    assert _tokens(source) == [2, 3, 4, 1, 5, 6, 1, 7, 8, 1]


def test_reading_stops_once_max_tokens_are_read(tmp_path):
    tok = word_tokenizer()
    texts = [" ".join(WORDS[i : i + 50]) for i in range(0, 400, 50)]
    lines = [json.dumps({"text": text}) for text in texts]
    # what comes after the lines that give the tokens is never read: not JSON, not UTF-8
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes("\n".join(lines).encode() + b"\nnot json\ncaf\xe9\n")
    source = resolve_source(f"jsonl:{jsonl}", None, tok, 16, max_tokens=160)
    assert _tokens(source) == [t for text in texts[:4] for t in [*_ids(tok, text), 1]][:160]
    with pytest.raises(InvalidArgumentError, match=r"a\.jsonl:9 is not valid JSON"):
        resolve_source(f"jsonl:{jsonl}", None, tok, 16)

    text = tmp_path / "a.txt"
    paragraphs = [" ".join(WORDS[i : i + 100]) for i in range(0, 400, 100)]
    text.write_bytes("\n\n".join(paragraphs).encode() + b"\n\ncaf\xe9\n")
    source = resolve_source(f"text:{text}", None, tok, 16, max_tokens=150)
    assert _tokens(source) == [*_ids(tok, paragraphs[0]), 1, *_ids(tok, paragraphs[1])][:144]
    with pytest.raises(InvalidArgumentError, match=r"a\.txt:9 is not UTF-8"):
        resolve_source(f"text:{text}", None, tok, 16)


def test_one_long_paragraph_is_not_read_whole_for_a_few_tokens(tmp_path):
    tok = word_tokenizer()
    # a file without blank lines is one paragraph: more than LONG_PARAGRAPH_CHARS of it
    lines = [" ".join(WORDS[i % 300 : i % 300 + 20]) for i in range(0, 60_000, 20)]
    assert sum(len(line) + 1 for line in lines) > 2 * LONG_PARAGRAPH_CHARS
    broken = tmp_path / "broken.txt"
    broken.write_bytes("\n".join(lines).encode() + b"\ncaf\xe9")
    # the first lines' tokens are the whole paragraph's
    source = resolve_source(f"text:{broken}", None, tok, 16, max_tokens=4000)
    assert _tokens(source) == _ids(tok, "\n".join(lines))[:4000]
    with pytest.raises(InvalidArgumentError, match=r"broken\.txt:3001 is not UTF-8"):
        resolve_source(f"text:{broken}", None, tok, 16)


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    tok = word_tokenizer()
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("w2 w3\n\n" + "caf\xe9 w4\n").encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match=r"latin1\.txt:3 is not UTF-8 .*iconv"):
        resolve_source(f"text:{latin}", None, tok, 16)
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "w2"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidArgumentError, match=r"latin1\.jsonl:2 is not UTF-8"):
        resolve_source(f"jsonl:{jsonl}", None, tok, 16)


@pytest.mark.parametrize(
    ("row", "found"),
    [({"text": 5}, "'text' is of type int"), ({"text": ["w2"]}, "'text' is of type list"),
     ({"body": "w2"}, "missing"), ({"text": None}, "missing"),
     ("w2 w3", "the row is of type str")],
)  # fmt: skip
def test_dataset_rows_without_a_string_field_name_the_row(row, found):
    rows = [{"text": "w2 w3"}, {"text": "w4"}, row, {"text": "w5"}]
    texts = dataset_texts(rows, "some/dataset")
    assert [next(texts), next(texts)] == ["w2 w3", "w4"]
    with pytest.raises(
        InvalidArgumentError, match=rf"'some/dataset' row 2 has no string field 'text' \({found}\)"
    ):
        next(texts)
    assert list(dataset_texts([{"body": "w2"}], "d", field="body")) == ["w2"]


def test_jsonl_paths_may_hold_a_colon(tmp_path):
    tok = word_tokenizer()
    body = "\n".join(json.dumps({"text": "w2 w3", "body": "w4 w5"}) for _ in range(4))
    colon = tmp_path / "a:b.jsonl"
    colon.write_text(body)
    assert _tokens(resolve_source(f"jsonl:{colon}", None, tok, 3)) == [2, 3, 1] * 4
    assert _tokens(resolve_source(f"jsonl:{colon}:body", None, tok, 3)) == [4, 5, 1] * 4
    assert _tokens(resolve_source(f"jsonl:{colon}:", None, tok, 3)) == [2, 3, 1] * 4
    # a file whose name ends in ':FIELD' is that file, not a field of another one
    named = tmp_path / "c.jsonl:body"
    named.write_text(body)
    assert jsonl_path_and_field(str(named)) == (named, "text")
    assert jsonl_path_and_field("data/x.jsonl:content") == (Path("data/x.jsonl"), "content")
    # what follows the last ':' is no field name: part of the path
    for spec in ("C:\\data\\x.jsonl", "dir:1/x.jsonl", "x:y.jsonl", "x.jsonl:a-b"):
        assert jsonl_path_and_field(spec) == (Path(spec), "text")
    with pytest.raises(NotFoundError, match=r"missing:b\.jsonl does not exist"):
        resolve_source(f"jsonl:{tmp_path / 'missing:b.jsonl'}", None, tok, 3)
    # after an existing file, any field name: JSON keys need not be identifiers
    dashed = tmp_path / "d.jsonl"
    dashed.write_text("\n".join(json.dumps({"raw-content": "w6 w7"}) for _ in range(4)))
    assert jsonl_path_and_field(f"{dashed}:raw-content") == (dashed, "raw-content")
    assert _tokens(resolve_source(f"jsonl:{dashed}:raw-content", None, tok, 3)) == [6, 7, 1] * 4


def _trained_tokenizer(kind: str, corpus: list[str]):
    """A small subword tokenizer trained on ``corpus``: byte-level BPE (GPT-2's scheme) or
    a SentencePiece-style unigram model (Metaspace)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=200, special_tokens=["<unk>"], unk_token="<unk>"
        )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["bytelevel", "unigram"])
def test_a_long_paragraph_cut_at_a_line_gives_the_whole_paragraphs_tokens(tmp_path, kind):
    gen = random.Random(0)
    vocab = [
        "the",
        "cat",
        "sat",
        "on",
        "mat",
        "Hello",
        "1999",
        " ",
        "naïve",
        "東京",
        "!",
        "--",
        "\t",
    ]
    lines = [
        "x " + " ".join(gen.choice(vocab) for _ in range(gen.randint(1, 25))) + gen.choice("  x")
        for _ in range(4000)
    ]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines))
    assert len(path.read_text()) > 2 * LONG_PARAGRAPH_CHARS
    tok = _trained_tokenizer(kind, lines[:300])
    whole = _ids(tok, "\n".join(lines).strip())
    for max_tokens in (2000, 30_000):
        source = resolve_source(f"text:{path}", None, tok, 10, max_tokens=max_tokens)
        assert _tokens(source) == whole[:max_tokens]
