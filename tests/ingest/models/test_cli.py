"""``circuitscope model``: families listing, checkpoint info and the exactness check."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from tests.ingest.models.helpers import build, word_tokenizer

pytestmark = pytest.mark.unit


def test_families_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "families"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox" in out and "llama, mistral, qwen2" in out


def test_info_and_check_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build("neox_parallel")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    assert main(["model", "info", str(tmp_path), "--prompt", "w2 w3 w4 w9 w30"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox" in out and "True" in out  # parallel residual
    assert "check                      pass" in out
    fingerprint = next(line.split()[-1] for line in out.splitlines() if line.startswith("fing"))
    assert len(fingerprint) == 64
    assert "unknown-token" not in out
    # words outside the vocabulary are still checked, and said
    assert main(["model", "info", str(tmp_path), "--prompt", "w2 zebra crossing"]) == 0
    out = capsys.readouterr().out
    assert "unknown-token ids          2 " in out and "check                      pass" in out


def test_info_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitscope: error:") and "config.json" in err
    assert err.count("\n") == 1
