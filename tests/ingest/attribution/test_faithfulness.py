"""The MIB faithfulness protocol on attribution graphs: areas, metrics, scorers, curves."""

import math

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.faithfulness import (
    DEFAULT_FRACTIONS,
    EDGE_SCORERS,
    FaithfulnessCurve,
    FaithfulnessSetup,
    area_scores,
    attribution_scores,
    circuit_metric,
    compare_methods,
    eap_scores,
    kept_edge_count,
    logit_diff_metric,
    plot_curves,
    prob_diff_metric,
    weight_scores,
)
from ingest.attribution.interventions import ReplacementRunner
from ingest.attribution.replacement import build_replacement
from ingest.attribution.targets import LogitDiffTarget
from ingest.errors import InvalidArgumentError

from . import models as m

pytestmark = pytest.mark.unit

PROMPT = torch.tensor([[3, 17, 8, 25, 11, 3, 30]])
COUNTER = torch.tensor([[5, 17, 9, 25, 12, 4, 30]])


def test_area_scores_by_hand() -> None:
    cpr, cmd = area_scores([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    with pytest.raises(InvalidArgumentError):
        area_scores([0.5, 0.1], [1.0, 1.0])
    with pytest.raises(InvalidArgumentError):
        area_scores([0.0, 1.0], [1.0, 1.0], log_k=True)


def test_mib_area_on_the_mib_grid() -> None:
    """MIB's x-axis is k itself on 0.1 ... 100 %: the x-range is 0.999."""
    ks = list(DEFAULT_FRACTIONS)
    ones = [1.0] * len(ks)
    assert area_scores(ks, ones) == pytest.approx((0.999, 0.0))
    # Empty until the full circuit (a random ranking on a sparse counterfactual): only the
    # last trapezoid, (1 - 0.5) * (0 + 1) / 2, counts: MIB's random baseline 0.25 / 0.75.
    last_only = [0.0] * (len(ks) - 1) + [1.0]
    assert area_scores(ks, last_only) == pytest.approx((0.25, 0.749))
    # A step to 1 at k = 20 %: CPR 0.1 * 0.5 + 0.3 + 0.5, CMD 0.099 + 0.1 * 0.5.
    step = [0.0 if k < 0.2 else 1.0 for k in ks]
    assert area_scores(ks, step) == pytest.approx((0.85, 0.149))
    # Overshooting circuits push CPR above the x-range (MIB reports CPR up to 1.8).
    assert area_scores(ks, [2.0] * len(ks))[0] == pytest.approx(1.998)


def test_log_k_area_weighs_every_decade_alike() -> None:
    ks = list(DEFAULT_FRACTIONS)
    assert area_scores(ks, [1.0] * len(ks), log_k=True) == pytest.approx((1.0, 0.0))
    last_only = [0.0] * (len(ks) - 1) + [1.0]
    expected = 0.5 * math.log(2) / math.log(1000)  # the last step, ln(1 / 0.5), of ln(1000)
    assert area_scores(ks, last_only, log_k=True) == pytest.approx((expected, 1 - expected))
    # The step at 20 % scores 0.85 linearly but well under half on the log axis.
    step = [0.0 if k < 0.2 else 1.0 for k in ks]
    cpr_log = (0.5 * math.log(2) + math.log(2.5) + math.log(2)) / math.log(1000)
    assert area_scores(ks, step, log_k=True)[0] == pytest.approx(cpr_log)


def test_kept_edge_count_is_mibs_floor() -> None:
    assert kept_edge_count(34760, 0.001) == 34
    assert kept_edge_count(100, 0.29) == 29
    assert kept_edge_count(999, 0.001) == 0
    assert kept_edge_count(999, 1.0) == 999


def test_prob_diff_metric_by_hand() -> None:
    logits = torch.zeros(1, 2, 3)
    logits[0, -1] = torch.tensor([0.0, 0.0, math.log(2.0)])  # probabilities 1/4, 1/4, 1/2
    assert float(prob_diff_metric([2], [0])(logits)) == pytest.approx(0.25)
    assert float(prob_diff_metric([0, 1], [2])(logits)) == pytest.approx(0.0)
    assert float(prob_diff_metric([2, 1], [])(logits)) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def setup():
    adp = m.adapter("gpt2", torch.float64)
    tcs = m.transcoder_set(adp)
    metric = logit_diff_metric(6, 9)
    result = attribute(adp, tcs, PROMPT, target=LogitDiffTarget(6, 9))
    return adp, tcs, metric, result


def test_circuit_metric_limits(setup) -> None:
    adp, tcs, metric, result = setup
    clean = build_replacement(adp, tcs, PROMPT)
    cf = build_replacement(adp, tcs, COUNTER)
    runner = ReplacementRunner(adp, tcs, clean)
    everything = torch.ones(result.layout.n, dtype=torch.bool)
    nothing = torch.zeros(result.layout.n, dtype=torch.bool)
    assert circuit_metric(runner, result, everything, cf, metric) == pytest.approx(
        float(metric(adp(PROMPT))), abs=1e-9
    )
    assert circuit_metric(runner, result, nothing, cf, metric) == pytest.approx(
        float(metric(adp(COUNTER))), abs=1e-9
    )


@pytest.mark.parametrize("patching", ["edge", "node"])
def test_curves_of_all_methods_and_plot(setup, tmp_path, patching: str) -> None:
    adp, tcs, metric, result = setup
    curves = compare_methods(adp, tcs, result, PROMPT, COUNTER, metric, patching=patching)
    assert [c.method for c in curves] == list(EDGE_SCORERS)
    n_edges = int((result.adjacency != 0).sum())
    if patching == "node":  # the real runs bound the curve
        assert curves[0].m_empty == pytest.approx(float(metric(adp(COUNTER))), abs=1e-9)
    else:  # the linearized counterfactual run
        linear = FaithfulnessSetup.build(adp, tcs, result, PROMPT, COUNTER, metric).linear
        nothing = torch.zeros(result.adjacency.shape, dtype=torch.bool)
        assert curves[0].m_empty == pytest.approx(linear.metric(nothing), abs=1e-9)
    assert curves[0].m_full == pytest.approx(float(metric(adp(PROMPT))), abs=1e-8)
    n_items = n_edges if patching == "edge" else result.layout.n_sources
    for c in curves:
        assert c.fractions == list(DEFAULT_FRACTIONS)
        assert c.n_edges == [kept_edge_count(n_items, k) for k in DEFAULT_FRACTIONS]
        assert c.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
        assert (c.cpr, c.cmd) == area_scores(c.fractions, c.faithfulness)
        assert (c.cpr_log_k, c.cmd_log_k) == area_scores(c.fractions, c.faithfulness, log_k=True)
        if c.n_edges[0] == 0:
            assert c.faithfulness[0] == pytest.approx(0.0, abs=1e-9)
    png = plot_curves(curves, tmp_path / "f.png", title="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_cover_exactly_the_graph_edges(setup) -> None:
    adp, tcs, metric, result = setup
    nonzero = result.adjacency != 0
    for scores in (attribution_scores(result), weight_scores(result)):
        assert not bool((scores[~nonzero] != 0).any())
    fs = FaithfulnessSetup.build(adp, tcs, result, PROMPT, COUNTER, metric)
    eap, signed = eap_scores(fs), eap_scores(fs, signed=True)
    assert not bool((eap[~nonzero] != 0).any()) and float(eap.sum()) > 0
    assert torch.equal(signed.abs(), eap)
    assert float(signed.min()) < 0 < float(signed.max())
    graph_top = attribute(adp, tcs, PROMPT)  # top-logit targets: no single metric node
    with pytest.raises(InvalidArgumentError, match="logit-difference"):
        FaithfulnessSetup.build(adp, tcs, graph_top, PROMPT, COUNTER, metric)


def test_signed_eap_predicts_single_edge_effects(setup) -> None:
    """Keeping one edge from an error or token into the metric node moves m(C) - m(empty)
    by exactly its signed EAP score: the target is linear in its edges, the metric a logit
    difference, and such a source keeps its clean value."""
    adp, tcs, metric, result = setup
    fs = FaithfulnessSetup.build(adp, tcs, result, PROMPT, COUNTER, metric)
    signed = eap_scores(fs, signed=True)
    row, first = result.layout.logits.start, result.layout.n_features
    col = first + int(torch.argmax(signed[row, first:].abs()))
    kept = torch.tensor([[row, col]])
    moved = fs.edge_metric(kept) - fs.m_empty
    assert moved == pytest.approx(float(signed[row, col]), rel=1e-9, abs=1e-12)
    assert abs(moved) > 0


def test_same_prompt_and_counterfactual_is_rejected(setup) -> None:
    adp, tcs, metric, result = setup
    with pytest.raises(InvalidArgumentError, match="counterfactual that changes"):
        FaithfulnessSetup.build(adp, tcs, result, PROMPT, PROMPT, metric)
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        compare_methods(adp, tcs, result, PROMPT, COUNTER, metric, methods=["best"])
    with pytest.raises(InvalidArgumentError, match="unknown patching"):
        FaithfulnessSetup.build(adp, tcs, result, PROMPT, COUNTER, metric, patching="head")
    # A graph is evaluated on its own prompt only: another prompt (of any length) would
    # read its nodes at positions that mean something else.
    for other in (COUNTER, PROMPT[:, :-1]):
        with pytest.raises(InvalidArgumentError, match="graph's own prompt"):
            FaithfulnessSetup.build(adp, tcs, result, other, PROMPT, metric)


@pytest.mark.parametrize(
    ("m_empty", "m_counterfactual", "warned"),
    # the last: the linearized gap has the other sign than the real one
    [(12.21, -11.66, True), (-5.0, -19.6, False), (12.21, None, False), (20.0, 0.0, True)],
)
def test_a_curve_warns_when_the_linearized_counterfactual_barely_acts(
    m_empty: float, m_counterfactual: float | None, warned: bool
) -> None:
    # IOI with the subject swapped: frozen attention leaves the metric almost where it
    # was (12.33 -> 12.21) while the real counterfactual run turns it over (-11.66)
    curve = FaithfulnessCurve("attribution", [0.5, 1.0], [41.0, 1.0], [3, 6], 12.33, m_empty,
                              m_counterfactual)  # fmt: skip
    warning = curve.warning()
    assert (warning is not None) == warned
    if warned and m_empty == 12.21:
        assert "0.12" in warning and "24" in warning and "patching='node'" in warning
