"""load_model: checkpoint directories written by save_pretrained, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError
from ingest.models import LoadedModel, adapter_from_hf, load_model
from tests.ingest.models.helpers import (
    ARCHS,
    N_CTX,
    VOCAB,
    assert_logits_close,
    build,
    word_tokenizer,
)

pytestmark = pytest.mark.unit


def _save(tmp_path: Path, arch: str, tokenizer: bool = True) -> tuple[Path, torch.nn.Module]:
    model = build(arch)
    directory = tmp_path / arch
    model.save_pretrained(directory)
    if tokenizer:
        word_tokenizer().save_pretrained(directory)
    return directory, model


def test_a_local_checkpoint_has_one_model_id_however_its_path_is_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = _save(tmp_path, ARCHS[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    typed = [str(directory), directory.name, f"./{directory.name}/", f"~/{directory.name}"]
    ids = {load_model(name).model_id for name in typed}
    assert ids == {str(directory.resolve())}


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_a_checkpoint_directory(tmp_path: Path, arch: str) -> None:
    directory, model = _save(tmp_path, arch)
    loaded = load_model(str(directory))
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_id == str(directory.resolve())
    assert loaded.hf_config.model_type == model.config.model_type
    assert loaded.adapter.dtype == torch.float32 and loaded.adapter.device.type == "cpu"
    assert loaded.adapter.fingerprint() == adapter_from_hf(model).fingerprint()
    ids = loaded.tokenizer("w2 w3 w17 w40 nope w5", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 17, 40, 0, 5]]
    with torch.no_grad():
        assert_logits_close(loaded.adapter(ids), model(ids).logits)


def test_load_in_float64(tmp_path: Path) -> None:
    directory, model = _save(tmp_path, "neox_sequential")
    loaded = load_model(directory.as_posix(), dtype=torch.float64, device="cpu")
    assert loaded.adapter.dtype == torch.float64
    assert loaded.hf_model is not None and loaded.hf_model.dtype == torch.float64
    ids = torch.arange(2, 12)[None]
    with torch.no_grad():
        expected = model.to(torch.float64)(ids).logits
        torch.testing.assert_close(loaded.adapter(ids), expected, atol=1e-6, rtol=0)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(InvalidArgumentError, match=r"no config\.json"):
        load_model(str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="is a file"):
        load_model(str(tmp_path / "weights.txt"))


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such checkpoint directory"):
        load_model(str(tmp_path / "absent" / "model"))


def test_hub_id_offline_says_to_pass_a_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnavailableError, match="pass the local directory"):
        load_model("circuitscope-test/no-such-model-xyz")


def test_unreachable_hub_falls_back_to_the_cache_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # a loopback port nothing listens on: the connection is refused at once
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="hub cannot be reached"):
        load_model("circuitscope-test/no-such-model-xyz")
    assert time.monotonic() - started < 10


def test_unsupported_model_type_directory(tmp_path: Path) -> None:
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
        num_attention_heads=2, max_position_embeddings=N_CTX, word_embed_proj_dim=16,
    )  # fmt: skip
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    with pytest.raises(InvalidArgumentError, match=r"unsupported model_type 'opt'.*gpt_neox"):
        load_model(str(tmp_path / "opt"))


def test_checkpoint_without_tokenizer(tmp_path: Path) -> None:
    directory, _ = _save(tmp_path, "gpt2", tokenizer=False)
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        load_model(str(directory))


def test_bad_dtype_and_device(tmp_path: Path) -> None:
    directory, _ = _save(tmp_path, "gpt2")
    with pytest.raises(InvalidArgumentError, match="unsupported dtype"):
        load_model(str(directory), dtype=torch.int64)
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError, match="CUDA is not available"):
            load_model(str(directory), device="cuda")
