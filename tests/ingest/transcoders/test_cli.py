"""End to end through the console script on a tiny trained zoo model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ingest.transcoders.formats import detect_format, load_any
from service.cli import main

pytestmark = pytest.mark.slow

TRAIN = ["--width", "32", "--sparsity", "4", "--steps", "16", "--batch-size", "32",
         "--buffer-rows", "256", "--eval-every", "8", "--checkpoint-every", "8"]  # fmt: skip


def test_train_eval_stats_convert(tiny_zoo_dir, tmp_path, capsys):
    out = tmp_path / "tc"
    args = ["transcoders", "train", "--model", str(tiny_zoo_dir), "--out", str(out), *TRAIN]
    assert main([*args, "--aux-k-rows", "8", "--answer-weight", "2.5"]) == 0
    # TRAIN sets --buffer-rows 256: the split does not fit, so the buffer streams whole
    # windows (18 of the 14-token prompts)
    printed = capsys.readouterr().out
    assert "activation buffer: 252 rows per layer in whole windows" in printed
    assert "(streamed)" in printed and " 0 MiB" not in printed and " KiB" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["task"]["task"] == "greater_than"
    assert set(report["layers"]) == {"0"}
    # BatchTopK's threshold is calibrated to fire k per token on training rows: held-out
    # prompts of the same task land near k
    assert report["layers"]["0"]["l0"] == pytest.approx(4, rel=0.1)
    tset = load_any(out)
    assert tset.metadata.kind == "transcoder" and tset.config.k == 4
    assert tset.config.aux_k_rows == 8  # the dead-latent flags reach the module config
    assert tset.metadata.extra["train_config"]["answer_weight"] == 2.5

    assert main(["transcoders", "eval", str(out), "--model", str(tiny_zoo_dir), "--windows", "8",
                 "--json", str(tmp_path / "e.json"), "--split", "train",
                 "--task-examples", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "of the train split" in printed and " on 5 examples: " in printed
    on_train = json.loads((tmp_path / "e.json").read_text())
    assert on_train["split"] == "train" and report["split"] == "eval"
    assert on_train["task"]["examples"] == 5
    assert on_train["layers"]["0"]["ce_clean"] != report["layers"]["0"]["ce_clean"]

    assert main(["transcoders", "stats", str(out), "--model", str(tiny_zoo_dir),
                 "--windows", "16", "--top-k", "3"]) == 0  # fmt: skip
    stats = json.loads((out / "feature_stats.json").read_text())
    assert len(stats) == 32
    keys = {"set_id", "layer", "index", "density", "max_activation", "top_examples",
            "top_tokens", "output_tokens"}  # fmt: skip
    assert all(set(s) == keys for s in stats)
    active = [s for s in stats if s["density"] > 0]
    assert active and all(len(s["top_examples"]) <= 3 for s in stats)
    best = max(active, key=lambda s: s["max_activation"])
    assert best["max_activation"] == best["top_examples"][0]["activation"]
    for s in active:  # strongest first, one example per distinct context
        acts = [e["activation"] for e in s["top_examples"]]
        contexts = [e["context"] for e in s["top_examples"]]
        assert acts == sorted(acts, reverse=True) and len(set(contexts)) == len(contexts)
    assert len(best["top_tokens"]) == 10 and len(best["output_tokens"]) == 10

    assert main(["transcoders", "convert", str(out), str(tmp_path / "sl"), "--to", "saelens"]) == 0
    back = load_any(tmp_path / "sl")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in tset.state_dict().items())


def test_resume_after_a_kill_via_cli(tiny_zoo_dir, tmp_path):
    out = tmp_path / "tc"
    args = ["transcoders", "train", "--model", str(tiny_zoo_dir), "--out", str(out), "--no-eval"]
    assert main([*args, *TRAIN[:-4], "--eval-every", "8", "--checkpoint-every", "8",
                 "--steps", "8"]) == 0  # fmt: skip
    # A checkpoint of another length exists: the flags differ, so resuming is refused.
    assert main([*args, *TRAIN, "--resume"]) == 2


def test_user_errors_exit_2(tiny_zoo_dir, tmp_path, capsys):
    base = ["transcoders", "train", "--model", str(tiny_zoo_dir), "--no-eval", *TRAIN]
    assert main([*base, "--out", str(tmp_path / "a"), "--layers", "3"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a"), "--aux-k-rows", "-1"]) == 2
    assert "--aux-k-rows" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a"), "--dead-after-tokens", "0"]) == 2
    assert "--dead-after-tokens" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a"), "--answer-weight", "0"]) == 2
    assert "--answer-weight" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a"), "--lr", "nan"]) == 2
    assert "--lr) must be finite" in capsys.readouterr().err
    # A learning rate the weights overflow at: refused once seen, nothing non-finite saved.
    diverged = tmp_path / "diverged"
    assert main([*base, "--out", str(diverged), "--lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "training diverged by step 8" in err and "lower --lr (now 1e+30)" in err
    assert "no checkpoint was written" in err
    assert not list(diverged.glob("layer_*.safetensors"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main([*base, "--out", str(blocker / "tc")]) == 2
    assert "--out" in capsys.readouterr().err
    # A set trained on one model, evaluated on a model with other weights.
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    evaluate = ["transcoders", "eval", str(tmp_path / "b"), "--model", str(tiny_zoo_dir)]
    assert main([*evaluate, "--json", str(blocker / "e.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    for flag in ("--windows", "--dead-tokens", "--task-examples"):
        assert main([*evaluate, flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    # --resume where there is nothing to resume says so, and trains
    assert main([*base, "--out", str(tmp_path / "fresh"), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    pareto = ["transcoders", "pareto", "--model", str(tiny_zoo_dir), "--out", str(tmp_path / "p")]
    assert main([*pareto, "--sparsities", "4,4"]) == 2
    assert "--sparsities needs distinct values" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # pareto trains both kinds: no --kind
        main([*pareto, "--sparsities", "4", "--kind", "sae"])
    # convert: a missing source, and a destination that already holds files
    convert = ["transcoders", "convert", "--to", "saelens"]
    assert main([*convert, str(tmp_path / "nope"), str(tmp_path / "c")]) == 2
    assert "no transcoder set at" in capsys.readouterr().err
    assert main([*convert, str(tmp_path / "b"), str(tmp_path / "b")]) == 2
    assert "is src" in capsys.readouterr().err
    c = tmp_path / "c"
    assert main([*convert, str(tmp_path / "b"), str(c)]) == 0
    assert main([*convert, str(tmp_path / "b"), str(c)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces the set: no SAELens file is left to confuse the layout
    again = ["transcoders", "convert", str(tmp_path / "b"), str(c), "--overwrite"]
    assert main([*again, "--to", "circuit_tracer"]) == 0
    assert detect_format(c) == "circuit_tracer"
    assert not list(c.rglob("sae_weights.safetensors"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    assert main([*again[:3], str(tmp_path / "d"), "--overwrite", "--to", "saelens"]) == 2
    assert "not a transcoder set" in capsys.readouterr().err
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep me"
    other = tmp_path / "other-model"
    shutil.copytree(tiny_zoo_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["transcoders", "eval", str(tmp_path / "b"), "--model", str(other)]) == 2
    assert "weights differ" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "skip"), [(None, True), ("--skip", True), ("--no-skip", False)])
def test_pareto_writes_table_and_plot(tiny_zoo_dir, tmp_path, flag, skip):
    out = tmp_path / "pareto"
    # TopK: k latents per token at most, so every point's L0 is at most its sparsity
    args = ["transcoders", "pareto", "--model", str(tiny_zoo_dir), "--out", str(out),
            "--sparsities", "2,4", "--arch", "topk", "--width", "16", "--steps", "6",
            "--batch-size", "32", "--buffer-rows", "256", "--eval-every", "6",
            "--checkpoint-every", "6", *([flag] if flag else [])]  # fmt: skip
    assert main(args) == 0
    tables = json.loads((out / "pareto.json").read_text())
    rows = tables["runs"]
    # transcoders get the skip connection unless --no-skip, the SAE baseline never
    tc = "transcoder+skip" if skip else "transcoder"
    assert sorted((r["kind"], r["sparsity"], r["seed"]) for r in rows) == [
        ("sae", 2.0, 0), ("sae", 4.0, 0), (tc, 2.0, 0), (tc, 4.0, 0)
    ]  # fmt: skip
    assert [c["sparsity"] for c in tables["comparison"]] == [2.0, 4.0]
    # at equal L0: a transcoder run inside the SAE runs' L0 range, against their curve
    sae_l0 = sorted(r["l0"] for r in rows if r["kind"] == "sae")
    inside = [r for r in rows if r["kind"] == tc and sae_l0[0] <= r["l0"] <= sae_l0[-1]]
    assert [c["sparsity"] for c in tables["equal_l0"]] == [r["sparsity"] for r in inside]
    for row in rows:
        tset = load_any(Path(row["dir"]))
        has_skip = tset.W_skip(tset.layers[0]) is not None
        assert has_skip == (row["kind"] == "transcoder+skip")
    assert all(r["l0"] <= r["sparsity"] for r in rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| kind |" in (out / "pareto.md").read_text()


def test_pareto_over_seeds_pairs_each_seed(tiny_zoo_dir, tmp_path, capsys):
    out = tmp_path / "pareto"
    args = ["transcoders", "pareto", "--model", str(tiny_zoo_dir), "--out", str(out),
            "--sparsities", "4", "--seeds", "3,5", "--width", "16", "--steps", "6",
            "--batch-size", "32", "--buffer-rows", "256", "--eval-every", "6",
            "--checkpoint-every", "6"]  # fmt: skip
    assert main(args) == 0
    tables = json.loads((out / "pareto.json").read_text())
    runs = {(r["kind"], r["seed"]): r for r in tables["runs"]}
    assert sorted(runs) == [("sae", 3), ("sae", 5), ("transcoder+skip", 3), ("transcoder+skip", 5)]
    # each run is its own training at its own seed
    meta = json.loads((Path(runs["sae", 3]["dir"]) / "circuitscope.json").read_text())
    assert meta["extra"]["train_config"]["seed"] == 3
    assert runs["sae", 3]["fvu"] != runs["sae", 5]["fvu"]
    for row in tables["summary"]:
        ce = [r["ce_loss_recovered"] for (kind, _), r in runs.items() if kind == row["kind"]]
        assert row["seeds"] == 2
        assert row["ce_min"] == min(ce) and row["ce_max"] == max(ce)
        assert row["ce_loss_recovered"] == pytest.approx(sum(ce) / 2)
    (cmp,) = tables["comparison"]
    tc_loss = {s: runs["transcoder+skip", s]["delta_loss"] for s in (3, 5)}
    leads = [runs["sae", s]["delta_loss"] - tc_loss[s] for s in (3, 5)]
    assert (cmp["loss_lead_min"], cmp["loss_lead_max"]) == (min(leads), max(leads))
    printed = capsys.readouterr().out
    assert "paired by seed" in printed and cmp["verdict"] in printed
    assert main([*args[:-2], "--seeds", "1,1"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_pareto_gives_saes_their_own_sparsities(tiny_zoo_dir, tmp_path):
    out = tmp_path / "pareto"
    args = ["transcoders", "pareto", "--model", str(tiny_zoo_dir), "--out", str(out),
            "--sparsities", "2", "--sae-sparsities", "1,4", "--arch", "topk", "--width", "16",
            "--steps", "6", "--batch-size", "32", "--buffer-rows", "256", "--eval-every", "6",
            "--checkpoint-every", "6"]  # fmt: skip
    assert main(args) == 0
    tables = json.loads((out / "pareto.json").read_text())
    runs = {(r["kind"], r["sparsity"]): r for r in tables["runs"]}
    assert sorted(runs) == [("sae", 1.0), ("sae", 4.0), ("transcoder+skip", 2.0)]
    assert tables["comparison"] == []  # no sparsity has both kinds
    # but the SAE's curve spans the transcoder's L0 (TopK: L0 <= k), so equal L0 compares
    tc, low, high = runs["transcoder+skip", 2.0], runs["sae", 1.0], runs["sae", 4.0]
    inside = low["l0"] <= tc["l0"] <= high["l0"]
    assert [r["sparsity"] for r in tables["equal_l0"]] == ([2.0] if inside else [])


def test_zoo_source_windows_end_with_the_answer(tiny_zoo_dir):
    from transformers import AutoTokenizer

    from ingest.transcoders.sources import zoo_source
    from ingest.zoo.checkpoint import read_manifest, task_for_spec

    tok = AutoTokenizer.from_pretrained(tiny_zoo_dir)
    task = task_for_spec(read_manifest(tiny_zoo_dir).spec)
    source = zoo_source(tiny_zoo_dir, tok)
    heldout = task.examples("heldout")
    n = len(heldout)
    windows = source.get("eval", 0, n)
    # the split in a fixed shuffled order: every example once, each window ending with its
    # own example's answer, and a prefix not the generation order's
    rows = [tuple(row[m].tolist()) for row, m in zip(windows.ids, windows.mask, strict=True)]
    texts = [f"{e.prompt} {e.answers[0]}" for e in heldout]
    encoded = [tuple(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    answer = dict(zip(encoded, heldout, strict=True))
    assert sorted(rows) == sorted(encoded)
    for row in rows:
        assert row[-1] == tok.get_vocab()[answer[row].answers[0]]
    assert rows[:8] != encoded[:8]
    assert torch.equal(zoo_source(tiny_zoo_dir, tok).get("eval", 0, n).ids, windows.ids)
    assert source.n_windows("train") == len(task.examples("train"))
    windows = source.get("eval", 0, 4)
    # Greater-than trains on the answer alone: it is the one scored prediction per window.
    assert not task.loss_on_all_tokens and source.answer_only
    assert torch.equal(windows.scored.sum(1), torch.ones(4, dtype=torch.long))
    last = windows.mask.sum(1) - 1
    assert bool(windows.scored[torch.arange(4), last].all())


@pytest.mark.unit
def test_eval_report_flags_layers_whose_ablation_barely_moves_the_loss(capsys):
    from ingest.transcoders.cli import _print_report

    def layer(clean, ablate, rec, interval):
        return dict(l0=16.0, fvu=0.01, fvu_predicting=0.01, dead_fraction=0.0,
                    ce_loss_recovered=rec, ce_loss_recovered_95=interval, ce_clean=clean,
                    ce_ablate=ablate, delta_loss=7e-4, kl=6.9e-5, top1_agreement=1.0)  # fmt: skip

    report = dict(set_id="s", tokens=10, split="eval", ce_predictions=5, ce_positions="answer",
                  layers={"0": layer(0.005, 0.045, 0.99, [0.98, 0.995]),
                          "1": layer(0.005, 0.0065, 0.46, [-0.12, 1.07]),
                          "2": layer(0.085, 0.005, 1.01, [1.005, 1.02])},
                  all_layers=dict(ce_loss_recovered=1.0, ce_loss_recovered_95=[0.99, 1.01],
                                  delta_loss=1e-4, kl=2e-4, top1_agreement=1.0))  # fmt: skip
    _print_report(report)
    out = capsys.readouterr().out
    assert "4.00e-02" in out and "1.50e-03" in out  # each layer's ablation effect
    assert "6.9e-05" in out  # a small KL is printed, not rounded to 0.0000
    assert "[-0.1200, 1.0700]" in out and "(95% [0.9900, 1.0100])" in out
    flagged = [line for line in out.splitlines() if "barely moves the loss" in line]
    assert len(flagged) == 1 and "layer 1 (+1.5e-03 nats)" in flagged[0]
    # an ablation that lowers the loss inverts the ratio: said, with the layer
    inverted = [line for line in out.splitlines() if "reads the other way" in line]
    assert len(inverted) == 1 and "layer 2 (-8.0e-02 nats) lowers the loss" in inverted[0]
