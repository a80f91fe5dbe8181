"""``circuitscope attribute`` end to end on a saved tiny checkpoint, and bad input."""

import json

import pytest
import torch

from ingest.attribution.artifact import load_artifact
from ingest.models import load_model
from ingest.transcoders.formats import save
from service.cli import main

from . import models as m

pytestmark = pytest.mark.integration

PROMPT = "w3 w17 w8 w25 w11"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr-cli")
    model = m.hf_model("gpt2")
    model.save_pretrained(root / "model")
    m.word_tokenizer().save_pretrained(root / "model")
    adapter = load_model(str(root / "model")).adapter
    save(m.transcoder_set(adapter), root / "tc")
    other = m.transcoder_set(m.adapter("gpt2", seed=5))  # same shape, other weights
    save(other, root / "tc_other")
    return root


def run(saved, *extra: str, prompt: str = PROMPT) -> int:
    argv = ["attribute", prompt, "--model", str(saved / "model"),
            "--transcoders", str(saved / "tc"), "--no-progress", *extra]  # fmt: skip
    return main(argv)


def test_attribute_writes_artifact_and_json(saved, tmp_path, capsys) -> None:
    out, js = tmp_path / "artifact", tmp_path / "graph.json"
    assert run(saved, "--out", str(out), "--json", str(js), "--batch-size", "8",
               "--threads", "1") == 0  # fmt: skip
    printed = capsys.readouterr()
    assert "pruned:" in printed.out and "backward passes" in printed.out
    assert "Loading weights" not in printed.err  # --no-progress hides transformers' bar too
    result = load_artifact(out)
    assert result.metadata.tokens == PROMPT.split()
    assert result.metadata.artifact_uri == out.resolve().as_uri()
    n_rows = result.layout.n_features + result.layout.n_logits
    assert result.stats["n_backward_passes"] == -(-result.layout.n_features // 8) + -(
        -result.layout.n_logits // 8
    )
    assert n_rows > 0
    doc = json.loads(js.read_text())
    pruned = result.to_graph(pruned=True)
    assert len(doc["nodes"]) == pruned.n_nodes and len(doc["links"]) == pruned.n_edges
    assert doc["metadata"]["prompt"] == PROMPT
    # A second run into the same directory, or onto the same JSON file, is refused
    # before any work.
    assert run(saved, "--out", str(out)) == 2
    assert run(saved, "--json", str(js)) == 2
    assert f"{js} already exists: choose another --json or pass --overwrite" in (
        capsys.readouterr().err
    )
    assert run(saved, "--out", str(out), "--overwrite", "--logit-diff", "w3", "id:4") == 0
    assert " active features, 1 target), " in capsys.readouterr().out
    diff = load_artifact(out)
    assert diff.layout.n_logits == 1
    assert run(saved, "--out", str(out), "--overwrite", "--logit-diff", "w3", "w4") == 0
    assert load_artifact(out).nodes == diff.nodes  # "w4" is the token of id 4
    assert run(saved, "--out", str(out), "--overwrite", "--feature-target", "1", "3", "4") == 0
    feature = load_artifact(out)
    assert feature.layout.n_logits == 0 and feature.node_weights is not None
    weighted = feature.nodes[int(feature.node_weights.argmax())]
    assert weighted.node_id == "1_3_4"


@pytest.mark.parametrize(
    ("prompt", "extra", "message"),
    [
        ("   ", [], "empty"),
        (" ".join(["w3"] * (m.N_CTX + 1)), [], "context"),
        ("w3 hello w4", [], "cannot encode"),
        (PROMPT, ["--logit-diff", "w3", "id:999"], "outside the vocabulary"),
        (PROMPT, ["--logit-diff", "w3", "zebra"], "not in the vocabulary"),
        (PROMPT, ["--logit-diff", "w3", "w3"], "with itself"),
        (PROMPT, ["--transcoders-other"], "fingerprint"),
        (PROMPT, ["--dtype", "float64", "--device", "cuda:7"], "cuda"),
        (PROMPT, ["--feature-target", "1", "999", "4"], "feature indices"),
        (PROMPT, ["--feature-target", "1", "3", "9"], "outside the prompt"),
    ],
)
def test_bad_input_fails_cleanly(saved, tmp_path, capsys, prompt, extra, message) -> None:
    out, js = tmp_path / "artifact", tmp_path / "graph.json"
    if extra == ["--transcoders-other"]:
        extra = ["--transcoders", str(saved / "tc_other")]
    if "cuda:7" in extra and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    code = run(saved, "--out", str(out), "--json", str(js), *extra, prompt=prompt)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err.lower()  # every expected message is lower-case
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--threads", "0", "must be at least 1, got 0"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--max-feature-nodes", "-1", "must be at least 0, got -1"),
        ("--max-n-logits", "0", "must be at least 1, got 0"),
        ("--node-threshold", "1.5", "must lie in [0, 1], got 1.5"),
        ("--edge-threshold", "nan", "must be a finite number"),
        ("--desired-logit-prob", "inf", "must be a finite number"),
    ],
)
def test_bad_settings_are_refused_by_the_parser_naming_the_flag(
    saved, tmp_path, capsys, flag, value, message
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(saved, "--out", str(tmp_path / "artifact"), flag, value)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_unwritable_output_paths_fail_before_any_work(saved, tmp_path, capsys, flag) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    code = run(saved, flag, str(blocker / "inside"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert flag in err and "is a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("inside", [False, True])
def test_json_inside_the_artifact_directory_is_refused_before_any_work(
    saved, tmp_path, capsys, inside
) -> None:
    out = tmp_path / "artifact"
    js = out / "graph.json" if inside else out
    assert run(saved, "--out", str(out), "--json", str(js)) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "elsewhere" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
