"""The sweep's summary and its transcoder-against-SAE verdict, on hand-made runs."""

import pytest

from ingest.transcoders.pareto import compare, compare_at_equal_l0, render_markdown, summarize

pytestmark = pytest.mark.unit


def _run(
    kind: str,
    sparsity: float,
    seed: int,
    ce: float,
    kl: float = 0.01,
    l0: float | None = None,
    ablation: float = 1.0,
) -> dict[str, object]:
    """A run whose layers' zero-ablation changes the loss by ``ablation`` nats: its splice
    raises the loss by (1 - ce) * ablation (CE recovered ``ce``)."""
    return {
        "kind": kind, "sparsity": sparsity, "seed": seed,
        "l0": sparsity if l0 is None else l0, "fvu": 0.01,
        "dead_fraction": 0.1, "kl": kl, "top1_agreement": 1.0, "ce_loss_recovered": ce,
        "delta_loss": (1 - ce) * ablation, "ce_recovered_all": ce,
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
    assert at4["loss_lead_min"] == pytest.approx(0.005)
    assert at4["loss_lead_max"] == pytest.approx(0.01)
    assert at4["loss_lead_mean"] == pytest.approx(0.0075)


def test_the_loss_verdict_reads_delta_loss_not_an_inverted_ce_recovered():
    # Zero-ablation lowers the loss by 0.08 nats: CE recovered above 1 is a splice that
    # raises it. The SAE's 1.05 (+0.004 nats) beats the transcoder's 1.02 (+0.0016 nats)
    # by CE recovered; by the loss the transcoder is ahead.
    runs = [_run("transcoder", 4, s, 1.02, ablation=-0.08) for s in (0, 1)] + [
        _run("sae", 4, s, 1.05, ablation=-0.08) for s in (0, 1)
    ]
    (row,) = compare(runs)
    assert row["verdict"] == "transcoder ahead"
    assert row["loss_lead_mean"] == pytest.approx(0.004 - 0.0016)
    curve = [_run("sae", k, 0, 1.05, l0=l0, ablation=-0.08) for k, l0 in ((2, 2.0), (8, 8.0))]
    (at_l0,) = compare_at_equal_l0([*curve, runs[0]])
    assert at_l0["verdict"] == "transcoder ahead"


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
    assert only["seeds"] == 1 and only["loss_lead_mean"] == pytest.approx(0.1)
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


def test_equal_l0_reads_the_sae_curve_at_the_transcoders_l0():
    # L1-style sweeps: equal coefficients, unequal L0. The SAE's seed-0 curve runs from
    # (L0 4, CE 0.90, KL 0.04) to (L0 16, CE 0.98, KL 0.01); L0 8 is halfway in log L0.
    runs = [
        _run("sae", 0.1, 0, 0.98, kl=0.01, l0=16.0), _run("sae", 1.0, 0, 0.90, kl=0.04, l0=4.0),
        _run("transcoder", 0.1, 0, 0.95, kl=0.01, l0=8.0),
        _run("transcoder", 1.0, 0, 0.80, kl=0.1, l0=2.0),  # below the SAE's L0 range
    ]  # fmt: skip
    (row,) = compare_at_equal_l0(runs)
    assert row["sparsity"] == 0.1 and row["seeds"] == 1 and row["l0"] == 8.0
    assert row["sae_bracket"] == 4.0  # read between SAE runs at L0 4 and 16
    assert row["loss_lead_mean"] == pytest.approx(0.95 - 0.94)
    assert row["kl_ratio_mean"] == pytest.approx(0.01 / 0.02)  # the SAE's KL: 0.04 -> 0.01
    assert row["verdict"] == "transcoder ahead" and row["kl_verdict"] == "transcoder ahead"
    # paired at equal sparsity the same runs read the other way
    (by_sparsity,) = (c for c in compare(runs) if c["sparsity"] == 0.1)
    assert by_sparsity["verdict"] == "SAE ahead"


def test_equal_l0_pairs_each_seed_with_its_own_curve():
    runs = [
        *(_run("sae", s, 0, ce, l0=l0) for s, ce, l0 in ((1, 0.9, 4.0), (2, 0.95, 16.0))),
        *(_run("sae", s, 1, ce, l0=l0) for s, ce, l0 in ((1, 0.99, 4.0), (2, 0.995, 16.0))),
        _run("transcoder", 1, 0, 0.97, l0=8.0), _run("transcoder", 1, 1, 0.97, l0=8.0),
    ]  # fmt: skip
    (row,) = compare_at_equal_l0(runs)
    assert row["seeds"] == 2 and row["verdict"] == "level"
    leads = (row["loss_lead_min"], row["loss_lead_max"])
    assert leads == pytest.approx((0.97 - 0.9925, 0.97 - 0.925))
    assert compare_at_equal_l0([_run("transcoder", 1, 0, 0.97)]) == []
    # a transcoder run at an SAE run's own L0 is read there, not between two runs
    exact = [*runs[:2], _run("transcoder", 1, 0, 0.97, l0=16.0)]
    (at_run,) = compare_at_equal_l0(exact)
    assert at_run["sae_bracket"] == 1.0
    assert at_run["loss_lead_mean"] == pytest.approx(0.97 - 0.95)
    text = render_markdown({"runs": runs, "summary": summarize(runs), "comparison": [],
                            "equal_l0": [row]})  # fmt: skip
    assert "at equal L0" in text


def test_equal_l0_reads_the_sae_frontier_not_a_dominated_run():
    # an L1 sweep's run at L0 3 does worse than the sparser run at L0 2: it is not read,
    # so the transcoder at L0 4 is compared between L0 2 and 8 (halfway in log L0)
    runs = [
        _run("sae", 0.7, 0, 0.90, kl=0.04, l0=2.0), _run("sae", 0.8, 0, 0.50, kl=3.0, l0=3.0),
        _run("sae", 0.5, 0, 0.98, kl=0.01, l0=8.0), _run("transcoder", 0.1, 0, 0.93, l0=4.0),
    ]  # fmt: skip
    (row,) = compare_at_equal_l0(runs)
    assert row["loss_lead_mean"] == pytest.approx(0.93 - 0.94)
    assert row["kl_ratio_mean"] == pytest.approx(0.01 / 0.02)
    assert row["sae_bracket"] == 4.0
    # past the frontier's last run the sparser run's value stands
    tail = [*runs[:2], _run("transcoder", 0.1, 0, 0.93, kl=0.04, l0=2.5)]
    (past,) = compare_at_equal_l0(tail)
    assert past["loss_lead_mean"] == pytest.approx(0.03)
    assert past["kl_ratio_mean"] == pytest.approx(1.0)


@pytest.mark.unit
def test_a_nan_among_the_seeds_gives_no_verdict_whatever_its_place():
    # CE recovered is nan where ablation changes nothing; min and max over a list with a
    # nan depend on where it sits, so no verdict is drawn from such a list
    from ingest.transcoders.pareto import _paired_verdicts

    nan = float("nan")
    for diffs in ([0.1, nan], [nan, 0.1]):
        verdicts = _paired_verdicts(diffs, [0.5, 0.5])
        assert verdicts["verdict"] == "undetermined"
        assert verdicts["kl_verdict"] == "transcoder ahead"


@pytest.mark.unit
def test_cross_layer_runs_join_no_comparison():
    # a CLT run is neither side of the transcoder-against-SAE comparison: with a CLT
    # beside the SAE at every seed the verdicts are those of the two per-layer kinds
    with_clt = RUNS + [_run("clt", s, seed, 0.0) for s in (4, 8, 16) for seed in (0, 1)]
    assert compare(with_clt) == compare(RUNS)
