"""``circuitscope model``: families listing, checkpoint info and the exactness check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ingest.models import load_model
from ingest.models.cli import _check
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
    # an empty prompt is refused before anything loads; --no-progress leaves stderr quiet
    for empty in ("", "   "):
        assert main(["model", "info", str(tmp_path), "--prompt", empty]) == 2
        err = capsys.readouterr().err
        assert err == "circuitscope: error: --prompt is empty: give text to check the adapter on\n"
    assert main(["model", "info", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_info_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitscope: error:") and "config.json" in err
    assert err.count("\n") == 1


def _truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _resize_intermediate(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))


def _unknown_type(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "foo"}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate_weights, "is truncated or corrupt"),
        (_resize_intermediate, "config.json does not match the weights"),
        (_unknown_type, "unsupported model_type 'foo'"),
    ],
)
def test_info_refuses_a_broken_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message: str
) -> None:
    build("llama_gqa").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    damage(tmp_path)
    assert main(["model", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    # (HF may log its own loading report before it)
    errors = [line for line in err.splitlines() if line.startswith("circuitscope: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


# llama_tied (biases, one kv head) in bfloat16 on prompts where |adapter - HF| exceeded
# 5e-2 x the logit scale although both are as far from the float64 result
_HALF_CASES = [
    (0, "w10 w30 w7 w5 w33 w8 w23 w40 w18 w9 w10 w44 w23 w13 w46 w7"),
    (3, "w24 w15 w29 w24 w38 w27 w18 w43 w8 w39 w18 <eos> w47 w43 w21 w47"),
    (5, "w10 w30 w7 w5 w33 w8 w23 w40 w18 w9 w10 w44 w23 w13 w46 w7"),
]


@pytest.mark.parametrize(("seed", "prompt"), _HALF_CASES)
def test_half_precision_check_passes_a_correct_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int, prompt: str
) -> None:
    build("llama_tied", seed=seed).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    argv = ["model", "info", str(tmp_path), "--dtype", "bfloat16", "--prompt", prompt]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max |adapter - float64|" in out and "check                      pass" in out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_check_fails_a_wrong_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: torch.dtype
) -> None:
    build("gpt2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=dtype)
    prompt = "w2 w3 w4 w9 w30 w11 w7"
    assert _check(loaded, prompt) == 0
    for block in loaded.adapter.iter_blocks():
        block.attn.scale = 1.0  # a converter bug: no 1 / sqrt(d_head)
    assert _check(loaded, prompt) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")
