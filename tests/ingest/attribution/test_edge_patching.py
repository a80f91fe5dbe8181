"""Edge patching in the linearized replacement model against direct interventions."""

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.edge_patching import LinearizedPatching
from ingest.attribution.faithfulness import logit_diff_metric, prob_diff_metric
from ingest.attribution.interventions import ReplacementRunner, ablation_inputs
from ingest.attribution.replacement import build_replacement
from ingest.attribution.targets import LogitDiffTarget
from ingest.errors import InvalidArgumentError
from ingest.graph import NodeKind

from . import models as m

pytestmark = pytest.mark.unit

PROMPT = torch.tensor([[3, 17, 8, 25, 11, 3, 30]])
COUNTER = torch.tensor([[5, 17, 9, 25, 12, 4, 30]])


@pytest.fixture(
    scope="module",
    params=[("gpt2", "transcoder", False), ("llama", "transcoder", False), ("neox", "clt", True)],
    ids=["gpt2", "llama", "neox-clt-skip"],
)
def setup(request):
    family, kind, skip = request.param
    adp = m.adapter(family, torch.float64)
    tcs = m.transcoder_set(adp, kind, skip=skip)
    result = attribute(adp, tcs, PROMPT, target=LogitDiffTarget(6, 9))
    clean = build_replacement(adp, tcs, PROMPT)
    cf = build_replacement(adp, tcs, COUNTER)
    return adp, tcs, result, clean, cf, LinearizedPatching.build(adp, tcs, result, clean, cf)


def test_limits(setup) -> None:
    adp, tcs, result, clean, cf, lp = setup
    every = result.adjacency != 0
    # All edges kept: the clean logits, by row completeness.
    assert torch.allclose(lp.logits(every), clean.logits[0, -1].double(), atol=1e-8)
    assert lp.metric(every) == pytest.approx(float(logit_diff_metric(6, 9)(clean.logits)))
    # The target row of delta is the graph edge direction applied to the output block.
    row = result.layout.logits.start
    nothing = torch.zeros_like(every)
    expected = lp.metric(every) + float(lp.delta[row].sum())
    assert lp.metric(nothing) == pytest.approx(expected, abs=1e-8)
    # A counterfactual equal to the prompt changes nothing: every circuit is clean.
    same = LinearizedPatching.build(adp, tcs, result, clean, clean)
    assert float(same.delta.abs().max()) == 0.0 and float(same.out_delta.abs().max()) == 0.0
    assert same.metric(nothing) == pytest.approx(lp.metric(every), abs=1e-8)
    with pytest.raises(InvalidArgumentError, match="logit-difference"):
        LinearizedPatching.build(adp, tcs, attribute(adp, tcs, PROMPT), clean, cf)


def _frozen_run_with_sources(adp, tcs, result, clean, cf, inside: torch.Tensor) -> torch.Tensor:
    """Last-position logits (V,) of the replacement model, attention and norms frozen, with
    sources outside ``inside`` (n,) patched, sources inside recomputed, and features
    inactive on the prompt held at zero."""
    outside = [
        node
        for i, node in enumerate(result.nodes)
        if node.kind is not NodeKind.LOGIT and not bool(inside[i])
    ]
    over, errors, resid0 = ablation_inputs(clean, outside, "patch", cf)
    for layer, a in clean.activations.items():
        inactive = a == 0
        over.set_mask[layer] |= inactive
        over.set_values[layer][inactive] = 0.0
    runner = ReplacementRunner(adp, tcs, clean)
    out = runner.run(overrides=over, errors=errors, resid0=resid0, freeze_attention=True)
    return out.logits[0, -1].double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_source_closed_circuits_equal_the_frozen_runner(setup, seed: int) -> None:
    """A circuit that keeps every out-edge of a source set S, and no other, is node patching
    of the sources outside S: where the linearization is exact (frozen attention and norms,
    ReLU features, inactive features off) it equals a direct run of the replacement model."""
    adp, tcs, result, clean, cf, lp = setup
    gen = torch.Generator().manual_seed(seed)
    inside = torch.rand(result.layout.n, generator=gen) < 0.5
    keep = (result.adjacency != 0) & inside[None, :]
    direct = _frozen_run_with_sources(adp, tcs, result, clean, cf, inside)
    assert torch.allclose(lp.logits(keep), direct, atol=1e-9, rtol=1e-9)
    prob = prob_diff_metric([6, 7], [9])
    assert lp.metric(keep, prob) == pytest.approx(float(prob(direct[None, None])), abs=1e-12)
    # The circuit is not trivial: it lies strictly between the clean and patched runs.
    assert not torch.allclose(direct, clean.logits[0, -1].double(), atol=1e-6)


def test_no_edges_equal_the_frozen_counterfactual_sources(setup) -> None:
    adp, tcs, result, clean, cf, lp = setup
    nothing = torch.zeros(result.adjacency.shape, dtype=torch.bool)
    inside = torch.zeros(result.layout.n, dtype=torch.bool)
    direct = _frozen_run_with_sources(adp, tcs, result, clean, cf, inside)
    assert torch.allclose(lp.logits(nothing), direct, atol=1e-9, rtol=1e-9)
