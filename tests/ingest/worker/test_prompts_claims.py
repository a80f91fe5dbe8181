"""Unit tests of the ingest worker's prompt reader, graph keys, claims and retries."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError
from ingest.worker.claims import ClaimBook
from ingest.worker.keys import GraphSettings, graph_key
from ingest.worker.prompts import BadLine, PromptSpec, parse_line, read_prompts
from ingest.worker.retry import with_retry
from ingest.worker.worker import _validate_all

pytestmark = pytest.mark.unit


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_reports_bad_lines_with_numbers_and_keeps_going(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "a b c", "task": "t"}),
            "",
            "# a comment",
            "{not json",
            json.dumps({"text": "no prompt field"}),
            json.dumps({"prompt": "   "}),
            json.dumps({"prompt": "x", "correct": "y"}),
            json.dumps({"prompt": "x", "task": 3}),
            json.dumps(["a list"]),
            json.dumps({"prompt": "last one", "counterfactual": "other", "id": "p9"}),
            json.dumps({"prompt": 42}),
        ],
    )
    items = list(read_prompts(path))
    good = [i for i in items if isinstance(i, PromptSpec)]
    bad = {i.line: i.reason for i in items if isinstance(i, BadLine)}
    assert [(g.line, g.prompt) for g in good] == [(1, "a b c"), (10, "last one")]
    assert good[0].task == "t" and good[1].counterfactual == "other"
    assert good[1].prompt_id == "p9"
    assert sorted(bad) == [4, 5, 6, 7, 8, 9, 11]
    assert "JSON" in bad[4] and "prompt" in bad[5] and "together" in bad[7]
    assert "string" in bad[8]
    assert "'prompt' must be a string, got a JSON int" in bad[11]


def test_strict_validation_names_every_bad_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), "oops", "[]"])
    with pytest.raises(InvalidArgumentError, match=r"line 2.*line 3"):
        _validate_all(path)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        list(read_prompts(tmp_path / "absent.jsonl"))
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        list(read_prompts(tmp_path))


def test_graph_key_depends_on_everything_that_changes_the_graph() -> None:
    spec = PromptSpec(line=1, prompt="a b")
    base = graph_key("fp", "set", spec, GraphSettings())
    assert base == graph_key(
        "fp", "set", PromptSpec(line=99, prompt="a b", task="x"), GraphSettings()
    )
    variants = {
        graph_key("fp2", "set", spec, GraphSettings()),
        graph_key("fp", "set2", spec, GraphSettings()),
        graph_key("fp", "set", PromptSpec(line=1, prompt="a c"), GraphSettings()),
        graph_key("fp", "set", spec, GraphSettings(node_threshold=0.7)),
        graph_key("fp", "set", PromptSpec(1, "a b", correct="x", incorrect="y"), GraphSettings()),
    }
    assert base not in variants and len(variants) == 5
    assert len(base) == 32


def _claim_in_child(directory: str, graph_id: str, queue: "multiprocessing.Queue[bool]") -> None:
    queue.put(ClaimBook(Path(directory)).try_claim(graph_id) is not None)


def test_claims_are_exclusive_until_released(tmp_path: Path) -> None:
    book = ClaimBook(tmp_path)
    claim = book.try_claim("g1")
    assert claim is not None
    # Another live process cannot take it.
    queue: multiprocessing.Queue[bool] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_claim_in_child, args=(str(tmp_path), "g1", queue))
    child.start()
    assert queue.get(timeout=60) is False
    child.join(60)
    assert not child.is_alive()
    claim.release()
    assert book.try_claim("g1") is not None


def test_claim_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    child = multiprocessing.Process(target=lambda: None)
    child.start()
    child.join(60)
    assert not child.is_alive()
    dead_pid = child.pid
    assert dead_pid is not None
    (tmp_path / "g2.claim").write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead_pid, "expires": time.time() + 999})
    )
    assert ClaimBook(tmp_path).try_claim("g2") is not None


def test_expired_claim_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "g3.claim").write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() - 1})
    )
    assert ClaimBook(tmp_path).try_claim("g3") is not None


def test_retry_waits_out_an_outage_and_gives_up_after_the_budget() -> None:
    calls: list[int] = []
    messages: list[str] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise UnavailableError("down")
        return "ok"

    assert with_retry(flaky, what="w", first_delay_s=0.01, on_retry=messages.append) == "ok"
    assert len(calls) == 3 and len(messages) == 2 and "retrying" in messages[0]

    def down() -> None:
        raise UnavailableError("still down")

    with pytest.raises(UnavailableError):
        with_retry(down, what="w", first_delay_s=0.01, max_wait_s=0.05)


def test_retry_wait_ends_when_interrupted() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise UnavailableError("down")

    asked = time.monotonic() + 0.3
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="down"):
        with_retry(down, what="w", first_delay_s=0.2, interrupted=lambda: time.monotonic() > asked)
    # two calls (waits of 0.2 s, then the 0.4 s one cut short), not a budget's worth
    assert len(calls) == 2 and time.monotonic() - started < 3.0


def test_a_prompt_spec_gives_back_the_record_it_was_parsed_from() -> None:
    full = {"prompt": "a b", "counterfactual": "a c", "task": "t", "id": "p1",
            "correct": "b", "incorrect": "c"}  # fmt: skip
    for record in (full, {"prompt": "a b"}):
        spec = parse_line(1, json.dumps(record))
        assert isinstance(spec, PromptSpec) and spec.record() == record
