"""Training: tiny runs improve the metric, are reproducible, and save ordinary HF
checkpoints that load with the Auto classes and give the same logits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ingest.errors import InvalidArgumentError
from ingest.zoo.checkpoint import list_checkpoints, load_zoo_model, read_manifest
from ingest.zoo.evaluation import encode_examples, evaluate, model_logits
from ingest.zoo.tasks import TASKS
from ingest.zoo.trainer import ZooTrainResult, train_zoo_model

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.mark.slow
def test_tiny_training_improves_the_metric(tmp_path: Path) -> None:
    before = train_zoo_model(
        "greater_than", "gpt2", tiny=True, steps=1, out_dir=tmp_path / "a", progress=False
    )
    after = train_zoo_model(
        "greater_than", "gpt2", tiny=True, out_dir=tmp_path / "b", progress=False
    )
    assert after.metrics["prob_diff"] > before.metrics["prob_diff"] + 0.1
    history = read_manifest(after.out_dir).history
    assert history[-1]["step"] == after.spec.training.steps


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    runs = [
        train_zoo_model(
            "ioi", "llama", tiny=True, steps=10, seed=seed, out_dir=tmp_path / name, progress=False
        )
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    ]
    weights = [load_file(r.out_dir / "model.safetensors") for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.slow
def test_checkpoint_loads_with_auto_classes_and_gives_the_same_logits(
    tiny_greater_than: ZooTrainResult,
) -> None:
    directory = tiny_greater_than.out_dir
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    task = TASKS.get("greater_than")
    heldout = task.examples("heldout")
    assert evaluate(model, tokenizer, task, heldout) == pytest.approx(
        tiny_greater_than.metrics, abs=1e-6
    )
    loaded = load_zoo_model(directory)
    batch = encode_examples(task, tokenizer, heldout[:16])
    torch.testing.assert_close(
        model_logits(model, batch, torch.device("cpu")),
        model_logits(loaded.model, batch, torch.device("cpu")),
        rtol=0,
        atol=0,
    )
    manifest = json.loads((directory / "zoo.json").read_text())
    assert manifest["spec"]["task"] == "greater_than" and manifest["spec"]["seed"] == 0
    assert manifest["model_config"]["n_embd"] == task.tiny_shape().d_model
    assert {"torch", "transformers", "tokenizers"} <= manifest["versions"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_every_architecture_trains_and_reloads(arch: str, tmp_path: Path) -> None:
    result = train_zoo_model(
        "modular_addition", arch, tiny=True, steps=5, out_dir=tmp_path / arch, progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert type(model).__name__ == HF_CLASSES[arch]
    assert model.config.num_hidden_layers == 1
    if arch == "neox":  # 1-layer modular addition needs the MLP after attention
        assert model.config.use_parallel_residual is False
    assert set(result.metrics) == {"accuracy", "logit_diff"}


@pytest.mark.slow
def test_reuse_returns_a_matching_checkpoint_and_retrains_otherwise(
    tiny_greater_than: ZooTrainResult, tmp_path: Path
) -> None:
    again = train_zoo_model(
        "greater_than", "gpt2", tiny=True, out_dir=tiny_greater_than.out_dir, reuse=True
    )
    assert again.reused and again.metrics == tiny_greater_than.metrics
    found = list_checkpoints(tiny_greater_than.out_dir.parent)
    assert [d for d, _ in found] == [tiny_greater_than.out_dir]
    other = tmp_path / "other"
    first = train_zoo_model(
        "greater_than", "gpt2", tiny=True, steps=2, out_dir=other, progress=False
    )
    second = train_zoo_model(
        "greater_than",
        "gpt2",
        tiny=True,
        steps=2,
        seed=1,
        out_dir=other,
        reuse=True,
        progress=False,
    )
    assert not first.reused and not second.reused
    assert read_manifest(other).spec.seed == 1


@pytest.mark.unit
def test_bad_settings_are_domain_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown task 'nope'"):
        train_zoo_model("nope", "gpt2", tiny=True, out_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match="unknown architecture 'bert'"):
        train_zoo_model("ioi", "bert", tiny=True, out_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match="n_heads"):
        train_zoo_model("ioi", "gpt2", tiny=True, shape_overrides={"n_heads": 3}, out_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match="n_ctx"):
        train_zoo_model("ioi", "gpt2", tiny=True, shape_overrides={"n_ctx": 4}, out_dir=tmp_path)
