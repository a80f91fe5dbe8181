"""The MIB faithfulness protocol on attribution graphs."""

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.edge_patching import LinearizedPatching
from ingest.attribution.faithfulness import (
    DEFAULT_FRACTIONS,
    area_scores,
    attribution_scores,
    circuit_metric,
    compare_methods,
    eap_scores,
    logit_diff_metric,
    plot_curves,
    prob_diff_metric,
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
    assert [c.method for c in curves] == ["attribution", "random", "eap"]
    n_edges = int((result.adjacency != 0).sum())
    for c in curves:
        assert c.fractions == list(DEFAULT_FRACTIONS)
        assert c.n_edges[-1] == n_edges and c.n_edges[0] >= 1
        assert c.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
        cpr, cmd = area_scores(c.fractions, c.faithfulness)
        assert (c.cpr, c.cmd) == (cpr, cmd)
    png = plot_curves(curves, tmp_path / "f.png", title="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_cover_exactly_the_graph_edges(setup) -> None:
    adp, tcs, metric, result = setup
    nonzero = result.adjacency != 0
    att = attribution_scores(result)
    assert not bool((att[~nonzero] != 0).any())
    clean = build_replacement(adp, tcs, PROMPT)
    cf = build_replacement(adp, tcs, COUNTER)
    eap = eap_scores(adp, tcs, result, clean, cf, metric)
    assert not bool((eap[~nonzero] != 0).any()) and float(eap.sum()) > 0
    graph_top = attribute(adp, tcs, PROMPT)  # top-logit targets: EAP is undefined
    with pytest.raises(InvalidArgumentError, match="logit-difference"):
        eap_scores(adp, tcs, graph_top, clean, cf, metric)


def test_prob_diff_metric() -> None:
    logits = torch.zeros(1, 2, 4)
    logits[0, -1] = torch.tensor([0.0, 0.0, 0.0, 10.0])
    assert float(prob_diff_metric([3], [0, 1])(logits)) == pytest.approx(
        float(torch.softmax(logits[0, -1], -1)[3] - 2 * torch.softmax(logits[0, -1], -1)[0])
    )


def test_edge_patching_limits(setup) -> None:
    adp, tcs, metric, result = setup
    clean = build_replacement(adp, tcs, PROMPT)
    cf = build_replacement(adp, tcs, COUNTER)
    lp = LinearizedPatching.build(adp, tcs, result, clean, cf)
    every = result.adjacency != 0
    # All edges kept: the clean metric, by row completeness.
    assert lp.metric(every) == pytest.approx(float(metric(adp(PROMPT))), abs=1e-8)
    # No edge kept: bias plus every counterfactual contribution of the metric row.
    row = result.layout.logits.start
    expected = float(lp.bias[row] + (result.adjacency[row].double() + lp.delta[row]).sum())
    assert lp.metric(torch.zeros_like(every)) == pytest.approx(expected, abs=1e-10)
    # A counterfactual equal to the prompt changes nothing: every circuit is clean.
    same = LinearizedPatching.build(adp, tcs, result, clean, clean)
    assert float(same.delta.abs().max()) == 0.0
    assert same.metric(torch.zeros_like(every)) == pytest.approx(lp.metric(every), abs=1e-8)
    with pytest.raises(InvalidArgumentError, match="logit-difference"):
        LinearizedPatching.build(adp, tcs, attribute(adp, tcs, PROMPT), clean, cf)
