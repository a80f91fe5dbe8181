"""load_model: checkpoint directories written by save_pretrained, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM

from ingest.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
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
    with pytest.raises(InvalidArgumentError, match="unsupported dtype 'float65': use one of "):
        load_model(str(directory), dtype="float65")
    assert load_model(str(directory), dtype="float64").adapter.dtype == torch.float64
    assert load_model(str(directory), dtype="torch.bfloat16").adapter.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError, match="CUDA is not available"):
            load_model(str(directory), device="cuda")


def _edit_weights(directory: Path, edit) -> None:
    """Rewrite the checkpoint's model.safetensors through ``edit(state_dict)``."""
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _without(key: str):
    return lambda tensors: tensors.pop(key)


@pytest.mark.parametrize(
    ("arch", "key"),
    [
        ("llama_gqa", "lm_head.weight"),  # an untied head
        ("llama_gqa", "model.layers.1.mlp.down_proj.weight"),
        ("gpt2", "transformer.h.0.ln_1.weight"),
    ],
)
def test_a_checkpoint_missing_a_weight_is_refused(tmp_path: Path, arch: str, key: str) -> None:
    """HF would re-initialize the weight at random and load the rest."""
    directory, _ = _save(tmp_path, arch)
    _edit_weights(directory, _without(key))
    with pytest.raises(InvalidArgumentError, match=rf"lacks {key}: .*re-save it with save_pre"):
        load_model(str(directory))


def test_a_base_model_checkpoint_is_refused(tmp_path: Path) -> None:
    model = build("llama_gqa")
    model.model.save_pretrained(tmp_path)  # LlamaModel: no lm_head
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"lacks lm_head\.weight: .*base model"):
        load_model(str(tmp_path))


def test_weights_the_config_has_no_place_for_are_refused(tmp_path: Path) -> None:
    """HF would drop the biases: the config says the attention has none."""
    directory, _ = _save(tmp_path, "llama_tied")  # with attention biases
    _edit_config(directory, attention_bias=False)
    with pytest.raises(
        InvalidArgumentError, match=r"no place for \(model\.layers\.0\.self_attn\.k_proj\.bias, "
    ):
        load_model(str(directory))


def test_pythia_style_leftover_keys_are_not_refused(tmp_path: Path) -> None:
    """Old GPT-NeoX checkpoints (Pythia) carry per-layer rotary_emb.inv_freq, attention.bias
    and attention.masked_bias buffers: HF knows them to be harmless and does not report
    them, so the checkpoint loads."""
    directory, model = _save(tmp_path, "neox_parallel")

    def add_buffers(tensors: dict[str, torch.Tensor]) -> None:
        for layer in range(2):
            prefix = f"gpt_neox.layers.{layer}.attention."
            tensors[prefix + "rotary_emb.inv_freq"] = torch.ones(2)
            tensors[prefix + "bias"] = torch.ones(1, 1, N_CTX, N_CTX, dtype=torch.bool)
            tensors[prefix + "masked_bias"] = torch.tensor(-1e9)

    _edit_weights(directory, add_buffers)
    loaded = load_model(str(directory))
    assert loaded.adapter.fingerprint() == adapter_from_hf(model).fingerprint()


def test_gpt2_masked_bias_buffers_of_older_checkpoints_are_not_refused(tmp_path: Path) -> None:
    """GPT-2 checkpoints saved by older transformers carry per-layer ``attn.masked_bias``
    constants; transformers 5 reports them as unexpected, but the model rebuilds them, so
    the checkpoint is complete and loads."""
    directory, model = _save(tmp_path, "gpt2")
    _edit_weights(
        directory,
        lambda t: t.update(
            {f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}
        ),
    )
    loaded = load_model(str(directory))
    assert loaded.adapter.fingerprint() == adapter_from_hf(model).fingerprint()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: _edit_weights(
                d, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)})
            ),
            r"up_proj\.weight has shape \(40, 32\) in the checkpoint but the config implies "
            r"\(48, 32\);",
        ),
        (
            lambda d: _edit_config(d, intermediate_size=64),
            r"down_proj\.weight has shape \(32, 48\) in the checkpoint but the config implies "
            r"\(32, 64\) \(and 5 more tensors\)",
        ),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_refused(
    tmp_path: Path, edit, message: str
) -> None:
    directory, _ = _save(tmp_path, "llama_gqa")
    edit(directory)
    with pytest.raises(InvalidArgumentError, match=r"config\.json does not match the weights"):
        load_model(str(directory))
    with pytest.raises(InvalidArgumentError, match=message):
        load_model(str(directory))


def test_a_truncated_weight_file_is_refused(tmp_path: Path) -> None:
    directory, _ = _save(tmp_path, "llama_gqa")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InvalidArgumentError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert f"weight file {str(weights)!r} is truncated or corrupt" in message
    assert message.endswith("re-save or re-download it") and "\n" not in message


def test_a_model_type_transformers_does_not_know_names_the_families(tmp_path: Path) -> None:
    directory, _ = _save(tmp_path, "gpt2")
    _edit_config(directory, model_type="foo")
    with pytest.raises(InvalidArgumentError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert message.startswith("unsupported model_type 'foo': circuitscope supports gpt2, ")
    assert "\n" not in message and "upgrade" not in message
    config = json.loads((directory / "config.json").read_text())
    del config["model_type"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="names no model_type"):
        load_model(str(directory))


def _hub_answer(repo: str, status: int, code: str) -> OSError:
    """What transformers raises when the hub refuses ``repo``: an OSError raised from the
    exception the hub client makes of the response (``X-Error-Code``), here a real one."""
    from huggingface_hub.errors import Response
    from huggingface_hub.utils import get_session, hf_raise_for_status

    url = f"https://huggingface.co/{repo}/resolve/main/config.json"
    request = get_session().build_request("GET", url)
    response = Response(status, headers={"X-Error-Code": code}, request=request)
    try:
        try:
            hf_raise_for_status(response)
        except Exception as exc:
            raise OSError(f"cannot read {repo}: {exc}") from exc
    except OSError as wrapped:
        return wrapped
    raise AssertionError(f"the hub client accepted a {status} response")


def test_a_gated_repo_says_to_accept_the_licence_and_log_in() -> None:
    from ingest.models.loading import _hub_refusal

    repo = "meta-llama/Llama-3.2-1B"
    refusal = _hub_refusal(repo, _hub_answer(repo, 403, "GatedRepo"))
    assert isinstance(refusal, PermissionDeniedError)
    message = str(refusal)
    assert message.startswith(f"model '{repo}' is gated: accept its licence at ")
    assert f"/{repo} and log in" in message and "hf auth login" in message
    assert "HF_TOKEN" in message and "\n" not in message
    # a repository the hub does not show is still "not found"
    missing = _hub_refusal(repo, _hub_answer(repo, 401, "RepoNotFound"))
    assert isinstance(missing, NotFoundError) and "has no model" in str(missing)
    assert _hub_refusal(repo, OSError("disk full")) is None


def _cache_hub_model(cache: Path, repo: str, arch: str, weights: bool) -> torch.nn.Module:
    """``repo`` in an HF cache as the hub client lays it out: refs/main names a snapshot
    directory holding the files (here the config and tokenizer, and the weights if
    ``weights``)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    snapshot = root / "snapshots" / revision
    model = build(arch)
    if weights:
        model.save_pretrained(snapshot)
    else:
        model.config.save_pretrained(snapshot)
    word_tokenizer().save_pretrained(snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return model


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache, read offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_model_loads_offline(offline_cache: Path) -> None:
    model = _cache_hub_model(offline_cache, "someorg/tiny", "gpt2", weights=True)
    loaded = load_model("someorg/tiny")
    assert loaded.model_id == "someorg/tiny"
    assert loaded.adapter.fingerprint() == adapter_from_hf(model).fingerprint()


def test_a_hub_model_cached_without_weights_is_unavailable_offline(offline_cache: Path) -> None:
    _cache_hub_model(offline_cache, "someorg/tiny", "gpt2", weights=False)
    with pytest.raises(UnavailableError) as caught:
        load_model("someorg/tiny")
    message = str(caught.value)
    assert message.startswith(
        "the weights of 'someorg/tiny' are not in the local Hugging Face cache (its config is) "
        "and HF_HUB_OFFLINE is set: download it on a machine with internet access"
    )
    assert message.endswith("pass the local directory DIR")


def test_a_failed_weight_download_is_unavailable() -> None:
    """Online, a download that found no connection (the hub client's LocalEntryNotFoundError)
    is UnavailableError; a repository without weight files is InvalidArgumentError."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import GPT2Config

    from ingest.models.loading import _Source, _weights_error

    source = _Source("someorg/tiny", is_dir=False, local_only=False, config=GPT2Config())
    try:
        raise OSError("We couldn't connect to the hub") from LocalEntryNotFoundError("no cache")
    except OSError as exc:
        error = _weights_error("someorg/tiny", source, exc)
    assert isinstance(error, UnavailableError) and "retry, or download it" in str(error)
    error = _weights_error("someorg/tiny", source, OSError("no file named model.safetensors"))
    assert isinstance(error, InvalidArgumentError) and "is complete" in str(error)
