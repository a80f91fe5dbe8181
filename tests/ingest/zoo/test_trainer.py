"""Training: tiny runs improve the metric, are reproducible, and save ordinary HF
checkpoints that load with the Auto classes and give the same logits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ingest.errors import InvalidArgumentError
from ingest.zoo.checkpoint import (
    evaluate_checkpoint,
    list_checkpoints,
    load_zoo_model,
    read_manifest,
)
from ingest.zoo.evaluation import encode_examples, evaluate, model_logits, spread_subset
from ingest.zoo.task import TrainingConfig
from ingest.zoo.tasks import TASKS
from ingest.zoo.tokenizer import build_tokenizer
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


@pytest.mark.slow
def test_saved_tokenizer_names_a_class_every_transformers_version_loads(
    tiny_greater_than: ZooTrainResult,
) -> None:
    # transformers 5 writes "TokenizersBackend", which 4.x (allowed by pyproject) lacks.
    config = json.loads((tiny_greater_than.out_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(tiny_greater_than.out_dir)
    task = TASKS.get("greater_than")
    built = build_tokenizer(task)
    assert loaded.padding_side == "right" and loaded.get_vocab() == built.get_vocab()
    examples = task.examples("heldout")[:50] + task.examples("train")[:50]
    texts = [e.prompt for e in examples] + [e.counterfactual_prompt for e in examples]
    ids = loaded(texts)["input_ids"]
    assert ids == built(texts)["input_ids"]
    assert all(row[0] == loaded.bos_token_id and loaded.unk_token_id not in row for row in ids)
    decoded = [loaded.decode(row, skip_special_tokens=True) for row in ids]
    assert decoded == [built.decode(row, skip_special_tokens=True) for row in ids]
    assert loaded(decoded)["input_ids"] == ids
    # Words round-trip exactly; digit runs come back as the two-digit tokens they became.
    assert [d.replace(" ", "") for d in decoded] == [t.replace(" ", "") for t in texts]


@pytest.mark.slow
def test_reuse_retrains_a_checkpoint_whose_weights_are_gone(tmp_path: Path) -> None:
    first = train_zoo_model(
        "greater_than", "gpt2", tiny=True, steps=2, out_dir=tmp_path / "m", progress=False
    )
    (first.out_dir / "model.safetensors").unlink()
    again = train_zoo_model(
        "greater_than", "gpt2", tiny=True, steps=2, out_dir=first.out_dir, reuse=True,
        progress=False,
    )  # fmt: skip
    assert not again.reused
    assert (again.out_dir / "model.safetensors").is_file()
    assert load_zoo_model(again.out_dir).manifest.spec == first.spec


@pytest.mark.unit
@pytest.mark.parametrize(
    ("field", "value"),
    [("eval_every", 0), ("eval_examples", 0), ("warmup_steps", -5), ("eval_every", -1)],
)
def test_training_config_refuses_settings_that_cannot_run(
    field: str, value: int, tmp_path: Path
) -> None:
    base = {"steps": 10, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0}
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**base, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=field):
        train_zoo_model(
            "greater_than", "gpt2", tiny=True, out_dir=tmp_path, training_overrides={field: value}
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_outside_torchs_range_are_domain_errors(seed: int, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="seed must lie in"):
        train_zoo_model("greater_than", "gpt2", tiny=True, seed=seed, out_dir=tmp_path)


@pytest.mark.slow
def test_evaluating_at_most_n_examples_spreads_them_over_the_split(
    tiny_greater_than: ZooTrainResult,
) -> None:
    """``max_examples`` evaluates examples spread over the held-out split, not its first
    ones, which all share the key's leading part (greater-than's noun)."""
    task = TASKS.get("greater_than")
    heldout = task.examples("heldout")
    subset = spread_subset(heldout, 64)
    assert len(subset) == 64 and len({ex.key for ex in subset}) == 64
    assert len({ex.key[0] for ex in subset}) > 10  # many nouns
    assert len({ex.key[0] for ex in heldout[:64]}) == 1
    assert spread_subset(heldout[:5], 64) == heldout[:5]
    assert spread_subset(heldout, 0) == []
    loaded = load_zoo_model(tiny_greater_than.out_dir)
    expected = evaluate(loaded.model, loaded.tokenizer, task, subset)
    got = evaluate_checkpoint(tiny_greater_than.out_dir, max_examples=64)
    assert got == pytest.approx(expected, abs=1e-9)
