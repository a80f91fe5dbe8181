"""The sweep's summary and its transcoder-against-SAE verdict, on hand-made runs."""

import pytest

from ingest.transcoders.pareto import compare, render_markdown, summarize

pytestmark = pytest.mark.unit


def _run(
    kind: str, sparsity: float, seed: int, ce: float, kl: float = 0.01, l0: float | None = None
) -> dict[str, object]:
    return {
        "kind": kind, "sparsity": sparsity, "seed": seed,
        "l0": sparsity if l0 is None else l0, "fvu": 0.01,
        "dead_fraction": 0.1, "kl": kl, "top1_agreement": 1.0, "ce_loss_recovered": ce,
        "ce_recovered_all": ce,
    }  # fmt: skip


RUNS = [
    # L0 4: the transcoder ahead on every seed; L0 8: the SAE; L0 16: the sign varies
    *(_run("transcoder+skip", 4, s, 0.99) for s in (0, 1)),
    *(_run("sae", 4, s, ce) for s, ce in ((0, 0.98), (1, 0.985))),
    *(_run("transcoder+skip", 8, s, 0.97) for s in (0, 1)),
    *(_run("sae", 8, s, 0.99) for s in (0, 1)),
    *(_run("transcoder+skip", 16, s, ce) for s, ce in ((0, 0.99), (1, 0.97))),
    *(_run("sae", 16, s, 0.98) for s in (0, 1)),
]


def test_verdict_needs_every_seed_to_agree():
    verdicts = {c["sparsity"]: c["verdict"] for c in compare(RUNS)}
    assert verdicts == {4: "transcoder ahead", 8: "SAE ahead", 16: "level"}
    (at4,) = (c for c in compare(RUNS) if c["sparsity"] == 4)
    assert at4["seeds"] == 2
    assert at4["ce_diff_min"] == pytest.approx(0.005)
    assert at4["ce_diff_max"] == pytest.approx(0.01)
    assert at4["ce_diff_mean"] == pytest.approx(0.0075)


def test_kl_verdict_is_lower_is_better_and_separate_from_ce():
    # the transcoder recovers less CE at both seeds, but diverges less from the model
    runs = [
        _run("transcoder", 4, 0, 0.98, kl=0.001), _run("sae", 4, 0, 0.99, kl=0.002),
        _run("transcoder", 4, 1, 0.98, kl=0.003), _run("sae", 4, 1, 0.99, kl=0.004),
        _run("transcoder", 8, 0, 0.98, kl=0.0), _run("sae", 8, 0, 0.99, kl=0.0),
        _run("transcoder", 8, 1, 0.98, kl=0.001), _run("sae", 8, 1, 0.99, kl=0.0),
    ]  # fmt: skip
    at4, at8 = compare(runs)
    assert at4["verdict"] == "SAE ahead" and at4["kl_verdict"] == "transcoder ahead"
    assert (at4["kl_ratio_min"], at4["kl_ratio_max"]) == pytest.approx((0.5, 0.75))
    assert at8["kl_ratio_min"] == 1.0 and at8["kl_ratio_max"] == float("inf")
    assert at8["kl_verdict"] == "level"


def test_pairs_only_matching_seeds():
    # a seed that only one kind has is left out of the pairing
    runs = [_run("transcoder", 4, 0, 0.9), _run("sae", 4, 1, 0.95), _run("sae", 4, 0, 0.8)]
    (only,) = compare(runs)
    assert only["seeds"] == 1 and only["ce_diff_mean"] == pytest.approx(0.1)
    assert compare([_run("sae", 4, 0, 0.9)]) == []


def test_summary_means_and_ranges():
    rows = {(r["kind"], r["sparsity"]): r for r in summarize(RUNS)}
    tc16 = rows["transcoder+skip", 16]
    assert tc16["seeds"] == 2
    assert tc16["ce_loss_recovered"] == pytest.approx(0.98)
    assert (tc16["ce_min"], tc16["ce_max"]) == (0.97, 0.99)
    text = render_markdown({"runs": RUNS, "summary": summarize(RUNS), "comparison": compare(RUNS)})
    assert "paired by seed" in text and "| 16 | 2 |" in text and "kl_verdict" in text


def test_the_pairs_l0_ratio_is_reported():
    # BatchTopK lands near k: here the transcoder fires 20% and 10% more than the SAE
    runs = [
        _run("transcoder", 16, 0, 0.99, l0=18.0), _run("sae", 16, 0, 0.99, l0=15.0),
        _run("transcoder", 16, 1, 0.99, l0=16.5), _run("sae", 16, 1, 0.99, l0=15.0),
    ]  # fmt: skip
    (only,) = compare(runs)
    assert only["l0_ratio"] == pytest.approx(1.15)
    assert "l0_ratio" in render_markdown(
        {"runs": runs, "summary": summarize(runs), "comparison": compare(runs)}
    )
