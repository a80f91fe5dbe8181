"""The ``zoo`` and ``demo`` commands, called through ``service.cli.main``."""

import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ingest.paths import home
from ingest.zoo.checkpoint import read_manifest
from ingest.zoo.trainer import ZooTrainResult
from service.cli import main
from service.demo_cli import STAGES, DemoContext


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("circuitscope: error: ")
    for needle in needles:
        assert needle in err


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["zoo", "train", "sorting", "--tiny"], ["unknown task 'sorting'", "greater_than"]),
        (["zoo", "train", "ioi", "--arch", "bert", "--tiny"], ["unknown architecture", "llama"]),
        (["zoo", "train", "ioi", "--device", "cuda:99", "--tiny"], ["cuda:99"]),
        (["zoo", "train", "ioi", "--device", "tpu", "--tiny"], ["'tpu'"]),
        (["zoo", "train", "ioi", "--steps", "0"], ["--steps: must be at least 1, got 0"]),
        (["zoo", "eval", "x", "--max-examples", "0"], ["--max-examples: must be at least 1"]),
        (["zoo", "train", "ioi", "--out", ""], ["--out: an empty path"]),
        (["zoo", "eval", "~nosuchuser29/x"], ["'~nosuchuser29/x'", "home directory"]),
        (["zoo", "train", "ioi", "--tiny", "--seed", str(10**20)], ["seed must lie in 0.."]),
        (["zoo", "train", "ioi", "--tiny", "--seed", "-1"], ["seed must lie in 0.."]),
        (["demo", "--device", "cuda:99"], ["cuda:99"]),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals (a flag's type)
        code = exc.code
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(n in err for n in needles), err
    else:
        _one_line_error(capsys, *needles)
    assert code == 2


@pytest.mark.unit
def test_eval_of_a_directory_that_is_not_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["zoo", "eval", str(tmp_path)]) == 2
    _one_line_error(capsys, "is not a zoo checkpoint", "circuitscope zoo train")
    assert main(["zoo", "eval", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "does not exist")
    (tmp_path / "zoo.json").write_text("{not json")
    assert main(["zoo", "eval", str(tmp_path)]) == 2
    _one_line_error(capsys, "not a valid zoo manifest")
    for not_an_object in ("null", "[1, 2]"):
        (tmp_path / "zoo.json").write_text(not_an_object)
        assert main(["zoo", "eval", str(tmp_path)]) == 2
        _one_line_error(capsys, "not a valid zoo manifest", "not an object")
    assert main(["zoo", "eval", str(tmp_path / "zoo.json")]) == 2
    _one_line_error(capsys, "is a file", "checkpoint directory")


@pytest.mark.slow
def test_eval_prints_the_heldout_metrics(
    tiny_greater_than: ZooTrainResult, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["zoo", "eval", str(tiny_greater_than.out_dir), "--max-examples", "64"]) == 0
    out = capsys.readouterr().out
    assert "greater_than on gpt2" in out and "prob_diff" in out and "prob_diff >= 0.8" in out


def _damaged_copy(source: Path, target: Path, damage: str) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        tensors = load_file(weights)
        if damage == "reshaped":  # a position table one row short
            tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:-1].clone()
        elif damage == "missing":
            del tensors["transformer.h.0.mlp.c_fc.weight"]
        else:  # a tensor the architecture does not have
            tensors["transformer.h.7.attn.c_attn.weight"] = tensors[
                "transformer.wpe.weight"
            ].clone()
        save_file(tensors, weights, metadata={"format": "pt"})
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("truncated", "deserializing header"),
        ("reshaped", "mismatched keys"),
        ("missing", "missing keys"),
        ("unexpected", "unexpected keys"),
    ],
)
def test_eval_of_damaged_weights_is_one_line(
    damage: str,
    needle: str,
    tiny_greater_than: ZooTrainResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = _damaged_copy(tiny_greater_than.out_dir, tmp_path / damage, damage)
    assert main(["zoo", "eval", str(directory), "--max-examples", "4"]) == 2
    _one_line_error(capsys, "cannot be loaded", needle, "circuitscope zoo train")


@pytest.mark.slow
def test_train_then_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "train", "induction", "--arch", "neox", "--tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    target = home() / "zoo" / "induction-neox-tiny"
    assert str(target) in out and "loss_ratio" in out
    assert (target / "zoo.json").is_file()

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("greater_than", "modular_addition", "ioi", "induction", "gpt2", "neox", "llama"):
        assert name in out
    assert "induction-neox-tiny" in out


@pytest.mark.slow
def test_demo_zoo_model_stage_trains_then_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the demo's first stage: later stages belong to other subsystems' tests. A
    # home of its own, so a demo run by another test cannot have trained the model.
    monkeypatch.setenv("CIRCUITSCOPE_HOME", str(tmp_path))
    stage = STAGES[0]
    assert stage.name == "zoo-model"
    ctx = DemoContext(device="cpu", tiny=True, progress=False)
    first = "\n".join(stage.run(ctx))
    assert "prob_diff" in first and "trained in" in first
    assert str(home() / "zoo" / "greater_than-gpt2-tiny") in first
    assert ctx.results["zoo_model"].metrics["prob_diff"] > 0
    again = "\n".join(stage.run(DemoContext(device="cpu", tiny=True, progress=False)))
    assert "reused" in again
    # --retrain trains over the demo's own model
    retrained = "\n".join(
        stage.run(DemoContext(device="cpu", tiny=True, progress=False, retrain=True))
    )
    assert "trained in" in retrained and "reused" not in retrained


@pytest.mark.slow
def test_train_refuses_to_write_over_a_model_or_other_files(
    tiny_greater_than: ZooTrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_greater_than.out_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    train = ["zoo", "train", "greater_than", "--tiny", "--steps", "2", "--no-progress", "--out"]
    assert main([*train, str(model)]) == 2
    _one_line_error(capsys, "already holds a zoo model", "--overwrite")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main([*train, str(other), "--overwrite"]) == 2
    _one_line_error(capsys, "holds files that are not a zoo model's (mine.txt)")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before

    # --overwrite replaces the model; the new files are readable by others, and nothing
    # of the save is left beside them
    assert main([*train, str(model), "--overwrite"]) == 0
    assert read_manifest(model).spec.training.steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes"]
    assert sorted(p.name for p in model.iterdir()) == sorted(before)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in model.iterdir())

    # what a save interrupted before zoo.json left (no manifest) is replaced, with --overwrite
    (model / "zoo.json").unlink()
    assert main([*train, str(model)]) == 2
    _one_line_error(capsys, "already holds a zoo model")
    assert main([*train, str(model), "--overwrite"]) == 0
    assert read_manifest(model).spec.training.steps == 2


@pytest.mark.slow
def test_train_saves_into_the_working_directory_and_through_a_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    train = ["zoo", "train", "greater_than", "--tiny", "--steps", "2", "--no-progress", "--out"]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main([*train, "."]) == 0  # the working directory cannot be renamed
    assert read_manifest(here).spec.training.steps == 2
    # a killed save's staging is removed at the next save; a live process's is not
    dead, live = here / ".saving-999999999-x", here / f".saving-{os.getpid()}-y"
    dead.mkdir()
    live.mkdir()
    assert main([*train, ".", "--overwrite"]) == 0
    assert not dead.exists() and live.is_dir()
    live.rmdir()
    # a link: the model goes where it points, and the link stays a link
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main([*train, str(link)]) == 0
    assert link.is_symlink() and read_manifest(target).spec.training.steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "link", "target"]


@pytest.mark.slow
def test_a_failed_save_leaves_the_old_model_and_no_traceback(
    tiny_greater_than: ZooTrainResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ingest.zoo import trainer

    model = shutil.copytree(tiny_greater_than.out_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}

    def fail(tokenizer: object, directory: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "save_tokenizer", fail)
    argv = ["zoo", "train", "greater_than", "--tiny", "--steps", "2", "--no-progress"]
    argv.append("--overwrite")
    assert main([*argv, "--out", str(model)]) == 2
    _one_line_error(capsys, "could not save the model", "No space left", "is unchanged")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # no staging left
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    monkeypatch.undo()

    # a directory where a file goes is found before any file is moved
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").mkdir()
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert main([*argv, "--out", str(model)]) == 2
    _one_line_error(capsys, "tokenizer.json is a directory", "is unchanged")
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert read_manifest(model).spec == tiny_greater_than.spec


@pytest.mark.slow
def test_eval_refuses_a_manifest_naming_another_family(
    tiny_greater_than: ZooTrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    model = shutil.copytree(tiny_greater_than.out_dir, tmp_path / "model")
    manifest = json.loads((model / "zoo.json").read_text())
    for arch, needles in (("llama", ["says 'llama'", "holds a gpt2 model"]), ("bert", ["'bert'"])):
        manifest["spec"]["arch"] = arch
        (model / "zoo.json").write_text(json.dumps(manifest))
        assert main(["zoo", "eval", str(model), "--max-examples", "4"]) == 2
        _one_line_error(capsys, *needles, "circuitscope zoo train")
