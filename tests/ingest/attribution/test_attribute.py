"""Correctness of attribution graphs on random tiny models of the three families (DESIGN 5.4).

1. Reconstruction: the local replacement model reproduces the logits.
2. Row completeness: a target's incoming edges plus its bias terms equal its value.
3. Interventions: adding a source's vector in the frozen model moves every target by
   exactly that source's edge.
"""

import math

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.replacement import (
    build_replacement,
    replacement_logits,
)
from ingest.attribution.rows import RowComputer
from ingest.attribution.targets import FeatureTarget, LogitDiffTarget
from ingest.graph import NodeKind

from . import models as m
from .checks import (
    assert_interventions,
    assert_row_completeness,
    values,
    zero_constants,
)

pytestmark = pytest.mark.unit

SETS = [("transcoder", False), ("clt", True)]
# float64 on every family and set; float32 (looser tolerance) on per-layer transcoders.
GRID = [
    pytest.param(family, kind, skip, dtype, id=f"{family}-{kind}-{str(dtype)[6:]}")
    for family in m.FAMILIES
    for kind, skip in SETS
    for dtype in (torch.float64, torch.float32)
    if dtype == torch.float64 or kind == "transcoder"
]
PROMPT = [3, 17, 8, 25, 11, 3, 30]


@pytest.mark.parametrize("family", m.FAMILIES)
@pytest.mark.parametrize(("kind", "skip"), SETS)
def test_reconstruction(family: str, kind: str, skip: bool) -> None:
    adp = m.adapter(family, torch.float32)
    tcs = m.transcoder_set(adp, kind, skip)
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    logits = replacement_logits(adp, tcs, state)
    scale = state.logits.abs().max()
    assert float((logits - state.logits).abs().max()) <= 1e-5 * float(scale)
    # The errors are real: the transcoders alone do not reproduce the MLPs.
    assert float(state.errors[0].abs().max()) > 1e-2


@pytest.mark.parametrize(("family", "kind", "skip", "dtype"), GRID)
def test_row_completeness(family: str, kind: str, skip: bool, dtype: torch.dtype) -> None:
    adp = m.adapter(family, dtype)
    tcs = m.transcoder_set(adp, kind, skip)
    result = attribute(adp, tcs, PROMPT, batch_size=32)
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    assert_row_completeness(adp, tcs, state, result, 1e-5 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize(("family", "kind", "skip", "dtype"), GRID)
def test_interventions_match_edges(family: str, kind: str, skip: bool, dtype) -> None:
    adp = m.adapter(family, dtype)
    tcs = m.transcoder_set(adp, kind, skip)
    result = attribute(adp, tcs, PROMPT, batch_size=16)
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    assert_interventions(adp, tcs, state, result, 1e-5 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("family", m.FAMILIES)
@pytest.mark.parametrize(("kind", "skip"), SETS)
def test_a_leading_bos_has_no_features_and_graphs_stay_exact(
    family: str, kind: str, skip: bool
) -> None:
    """Position 0 holding the model's BOS token (the tiny models' bos_token_id is 0):
    its features are held at zero, its MLP output is error, and every identity holds."""
    adp = m.adapter(family, torch.float64)
    tcs = m.transcoder_set(adp, kind, skip)
    prompt = [0, *PROMPT]
    assert adp.bos_token_id == 0
    state = build_replacement(adp, tcs, torch.tensor([prompt]))
    assert state.zeroed_positions == 1
    plain = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    assert plain.zeroed_positions == 0
    for layer in tcs.layers:
        assert not bool(state.activations[layer][0].any())
        # the whole MLP output at position 0 is error, apart from b_dec (and the skip)
        skip_part = tcs.skip(layer, state.mlp_in[layer][0, 0])
        bare = tcs.b_dec(layer) + skip_part
        torch.testing.assert_close(state.errors[layer][0, 0], state.mlp_out[layer][0, 0] - bare)
    # the features the BOS position would have had are real: holding them is a choice
    assert sum(int(tcs.encode(lyr, state.mlp_in[lyr][0, :1]).count_nonzero()) for lyr in tcs.layers)
    logits = replacement_logits(adp, tcs, state)
    assert float((logits - state.logits).abs().max()) <= 1e-10 * float(state.logits.abs().max())
    result = attribute(adp, tcs, prompt, batch_size=16)
    assert all(n.pos != 0 for n in result.nodes if n.kind is NodeKind.FEATURE)
    assert any(n.pos == 0 for n in result.nodes if n.kind is NodeKind.ERROR)
    assert_row_completeness(adp, tcs, state, result, 1e-5)
    assert_interventions(adp, tcs, state, result, 1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_other_architectures_are_exact(arch: str) -> None:
    """TopK (k per token) and thresholded sets (JumpReLU, and BatchTopK, which infers as
    JumpReLU): rows complete and interventions match edges, as for ReLU."""
    adp = m.adapter("gpt2", torch.float64)
    tcs = m.transcoder_set(adp, arch=arch)
    result = attribute(adp, tcs, PROMPT, batch_size=32)
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    # the architecture's own selection: fewer features active than a ReLU would keep
    active = sum(int((a != 0).sum()) for a in state.activations.values())
    assert 0 < active < sum(int((p > 0).sum()) for p in state.pre_activations.values())
    assert_row_completeness(adp, tcs, state, result, 1e-5)
    assert_interventions(adp, tcs, state, result, 1e-5)


def test_reading_features_in_parts_does_not_change_edges(monkeypatch: pytest.MonkeyPatch) -> None:

    adp = m.adapter("llama", torch.float64)
    tcs = m.transcoder_set(adp, "clt", skip=True)
    whole = attribute(adp, tcs, PROMPT, batch_size=8)
    # a budget of 3 features per gather: every layer's features are read in parts
    monkeypatch.setattr(RowComputer, "gather_entries", 8 * 3 * adp.d_model)
    parts = attribute(adp, tcs, PROMPT, batch_size=8)
    assert whole.layout.n_features > 3 * adp.n_layers
    assert torch.equal(whole.adjacency, parts.adjacency)


def test_prefix_forwards_do_not_change_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches backpropagate through the forward on a prefix of the prompt that holds their
    reads: the edges equal those of the whole prompt's forward, for any number of prefixes."""
    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp, skip=True)
    monkeypatch.setattr(RowComputer, "prefix_parts", 1)
    whole = attribute(adp, tcs, PROMPT, batch_size=4)
    assert whole.stats["n_forward_passes"] == 2
    for parts in (3, len(PROMPT)):
        monkeypatch.setattr(RowComputer, "prefix_parts", parts)
        prefixes = attribute(adp, tcs, PROMPT, batch_size=4)
        assert 2 < prefixes.stats["n_forward_passes"] <= 1 + parts
        assert torch.allclose(whole.adjacency, prefixes.adjacency, rtol=0, atol=1e-12)
    assert whole.adjacency.abs().max() > 1e-3


def test_batching_counts_passes_and_does_not_change_edges() -> None:
    adp = m.adapter("gpt2", torch.float64)
    tcs = m.transcoder_set(adp)
    one = attribute(adp, tcs, PROMPT, batch_size=1)
    big = attribute(adp, tcs, PROMPT, batch_size=50)
    assert torch.allclose(one.adjacency, big.adjacency, atol=1e-12)
    n_f, n_l = one.layout.n_features, one.layout.n_logits
    assert one.stats["n_backward_passes"] == n_f + n_l
    assert big.stats["n_backward_passes"] == math.ceil(n_f / 50) + math.ceil(n_l / 50)
    # the recording, then the frozen forward on each prompt prefix the batches needed
    assert 2 <= big.stats["n_forward_passes"] <= 1 + RowComputer.prefix_parts
    # Causality: no edge from a later position or a same-or-later layer.
    lay = big.layout
    for t in list(range(lay.n_features)):
        tgt = big.nodes[t]
        for s in torch.nonzero(big.adjacency[t]).flatten().tolist():
            src = big.nodes[s]
            assert src.pos <= tgt.pos
            if src.kind is not NodeKind.TOKEN:
                assert src.layer < tgt.layer


def test_logit_targets_by_cumulative_probability() -> None:
    adp = m.adapter("llama", torch.float64)
    tcs = m.transcoder_set(adp)
    result = attribute(adp, tcs, PROMPT, target=None)
    probs = result.logit_probs
    assert 1 <= len(probs) <= 10
    assert bool((probs[:-1] >= probs[1:]).all())
    full = torch.softmax(build_replacement(adp, tcs, torch.tensor([PROMPT])).logits[0, -1], -1)
    if len(probs) < 10:
        assert float(probs.sum()) >= 0.95 and float(probs[:-1].sum()) < 0.95
    assert float(probs[0]) == pytest.approx(float(full.max()))


def test_max_feature_nodes_keeps_influential_features_with_exact_rows() -> None:
    adp = m.adapter("gpt2", torch.float64)
    tcs = m.transcoder_set(adp)
    full = attribute(adp, tcs, PROMPT, batch_size=8)
    part = attribute(adp, tcs, PROMPT, batch_size=8, max_feature_nodes=20)
    assert part.layout.n_features == 20
    assert part.stats["n_active_features"] == full.layout.n_features
    full_ids = [n.node_id for n in full.nodes]
    keep = [full_ids.index(n.node_id) for n in part.nodes]
    cols = [i for i in keep if i < full.layout.n_sources]
    expected = full.adjacency[keep][:, cols]
    assert torch.allclose(part.adjacency[:, : part.layout.n_sources], expected, atol=1e-12)
    # The most influential feature of the full graph is among those expanded.
    influence = full.prune().node_influence[: full.layout.n_features]
    top = full.nodes[int(torch.argmax(influence))].node_id
    assert top in {n.node_id for n in part.nodes}


def test_custom_targets() -> None:
    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp)
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    diff = attribute(adp, tcs, PROMPT, target=LogitDiffTarget(5, 9))
    assert diff.layout.n_logits == 1 and diff.nodes[-1].label == "logit diff 5 - 9"
    zero = torch.zeros_like(state.resid0)
    bias = values(adp, tcs, state, diff, zero, zero_constants(adp, tcs, state), None)
    last = state.logits[0, -1]
    row = diff.adjacency[-1, : diff.layout.n_sources]
    assert float(row.sum() + bias[-1]) == pytest.approx(float(last[5] - last[9]), abs=1e-9)

    node = next(n for n in diff.nodes if n.kind is NodeKind.FEATURE and n.layer == 1)
    feat = attribute(adp, tcs, PROMPT, target=FeatureTarget(1, node.feature, node.pos),
                     max_feature_nodes=5)  # fmt: skip
    assert feat.layout.n_logits == 0 and feat.node_weights is not None
    target_index = int(torch.nonzero(feat.node_weights).flatten()[0])
    assert feat.nodes[target_index].node_id == node.node_id
    graph = feat.to_graph(pruned=True)
    assert node.node_id in {n.node_id for n in graph.nodes}
    assert graph.n_edges > 0


def test_a_feature_target_is_expanded_first_and_ranks_the_budget() -> None:
    """Under a budget the target's own row comes first, so the rest of the budget goes to
    the features with the largest edges into it (in one batch: exactly those), and a
    budget of 0 still keeps the target."""
    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp)
    full = attribute(adp, tcs, PROMPT)
    node = next(n for n in reversed(full.nodes) if n.kind is NodeKind.FEATURE and n.layer == 1)
    target = FeatureTarget(1, node.feature, node.pos)
    whole = attribute(adp, tcs, PROMPT, target=target)
    row = whole.adjacency[int(torch.nonzero(whole.node_weights).flatten()[0])]
    features = whole.nodes[whole.layout.features]
    strongest = row[whole.layout.features].abs().argsort(descending=True)[:5]
    assert float(row[whole.layout.features].abs()[strongest[-1]]) > 0
    part = attribute(adp, tcs, PROMPT, target=target, max_feature_nodes=6, batch_size=64)
    kept = {n.node_id for n in part.nodes[part.layout.features]}
    assert kept == {node.node_id} | {features[int(i)].node_id for i in strongest}
    alone = attribute(adp, tcs, PROMPT, target=target, max_feature_nodes=0)
    assert [n.node_id for n in alone.nodes[alone.layout.features]] == [node.node_id]
