"""Interventions and ablations in the replacement model agree with the graph and the model."""

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.interventions import FeatureIntervention, ablate, intervene
from ingest.attribution.replacement import build_replacement
from ingest.errors import InvalidArgumentError
from ingest.graph import Node, NodeKind

from . import models as m

pytestmark = pytest.mark.unit

PROMPT = torch.tensor([[3, 17, 8, 25, 11, 3, 30]])
COUNTER = torch.tensor([[5, 17, 9, 25, 12, 4, 30]])


@pytest.fixture(scope="module", params=["llama"])
def setup(request):
    adp = m.adapter(request.param, torch.float64)
    tcs = m.transcoder_set(adp, "clt", skip=True)
    return adp, tcs


@pytest.mark.parametrize("freeze", [True, False])
def test_no_intervention_reproduces_the_model(setup, freeze: bool) -> None:
    adp, tcs = setup
    clean = adp(PROMPT)
    out = intervene(adp, tcs, PROMPT, [], freeze_attention=freeze)
    assert torch.allclose(out.logits, clean, atol=1e-10)
    state = build_replacement(adp, tcs, PROMPT)
    for layer, acts in out.activations.items():
        assert torch.allclose(acts, state.activations[layer], atol=1e-10)


def test_frozen_intervention_on_last_layer_feature_moves_logits_by_its_edges(setup) -> None:
    adp, tcs = setup
    result = attribute(adp, tcs, PROMPT)
    last = adp.n_layers - 1
    lay = result.layout
    feats = [(i, n) for i, n in enumerate(result.nodes[lay.features])
             if n.layer == last and n.pos == PROMPT.shape[1] - 1]  # fmt: skip
    assert feats
    clean = adp(PROMPT)[0, -1]
    for col, node in feats[:3]:
        cases = [
            (FeatureIntervention(last, node.pos, node.feature, value=0.0), -1.0),
            (FeatureIntervention(last, node.pos, node.feature, scale=3.0), 2.0),
        ]
        for iv, factor in cases:
            new = intervene(adp, tcs, PROMPT, [iv]).logits[0, -1]
            for row, logit in enumerate(result.nodes[lay.logits]):
                v = logit.token_id
                moved = (new[v] - new.mean()) - (clean[v] - clean.mean())
                edge = result.adjacency[lay.logits.start + row, col]
                assert float(moved) == pytest.approx(factor * float(edge), abs=1e-9)


def test_patching_every_node_gives_the_counterfactual_run(setup) -> None:
    adp, tcs = setup
    result = attribute(adp, tcs, PROMPT)
    nodes = [n for n in result.nodes if n.kind is not NodeKind.LOGIT]
    out = ablate(adp, tcs, PROMPT, nodes, mode="patch", counterfactual_ids=COUNTER)
    assert torch.allclose(out.logits, adp(COUNTER), atol=1e-9)
    half = ablate(adp, tcs, PROMPT, nodes[: len(nodes) // 2], mode="patch",
                  counterfactual_ids=COUNTER)  # fmt: skip
    assert not torch.allclose(half.logits, adp(COUNTER), atol=1e-3)


def test_a_leading_bos_keeps_runs_exact(setup) -> None:
    """With the model's BOS at position 0 (its features held at zero, its MLP output
    error), runs without interventions reproduce the model, frozen or not, and patching
    every graph node gives the counterfactual run."""
    adp, tcs = setup
    bos = torch.zeros(1, 1, dtype=torch.long)
    prompt, counter = torch.cat([bos, PROMPT], 1), torch.cat([bos, COUNTER], 1)
    state = build_replacement(adp, tcs, prompt)
    assert state.zeroed_positions == 1
    for freeze in (True, False):
        out = intervene(adp, tcs, prompt, [], freeze_attention=freeze)
        assert torch.allclose(out.logits, adp(prompt), atol=1e-10)
        for layer, acts in out.activations.items():
            assert not bool(acts[0].any())
            assert torch.allclose(acts, state.activations[layer], atol=1e-10)
    result = attribute(adp, tcs, prompt)
    nodes = [n for n in result.nodes if n.kind is not NodeKind.LOGIT]
    out = ablate(adp, tcs, prompt, nodes, mode="patch", counterfactual_ids=counter)
    assert torch.allclose(out.logits, adp(counter), atol=1e-9)


def test_zero_and_mean_ablation(setup) -> None:
    adp, tcs = setup
    state = build_replacement(adp, tcs, PROMPT)
    layer, pos = tcs.layers[0], 2
    index = int(torch.nonzero(state.activations[layer][pos])[0])
    node = Node(f"{layer}_{index}_{pos}", NodeKind.FEATURE, layer, pos, feature=index)
    zero = ablate(adp, tcs, PROMPT, [node], mode="zero")
    assert float(zero.activations[layer][pos, index]) == 0.0
    mean = ablate(adp, tcs, PROMPT, [node], mode="mean")
    expected = state.activations[layer][:, index].mean()
    assert float(mean.activations[layer][pos, index]) == pytest.approx(float(expected))
    # Ablating a token embedding at the last position changes the last logits.
    tok = Node("E_30_6", NodeKind.TOKEN, None, 6, token_id=30)
    assert not torch.allclose(ablate(adp, tcs, PROMPT, [tok]).logits[0, -1], adp(PROMPT)[0, -1])
    err = Node("err_0_6", NodeKind.ERROR, 0, 6)
    assert not torch.allclose(ablate(adp, tcs, PROMPT, [err]).logits[0, -1], adp(PROMPT)[0, -1])


def test_a_layer_without_a_transcoder_is_its_error_node() -> None:
    """The set covers layer 0 only: the last layer's MLP output is an error node. Frozen,
    it is held (the graph's model), so a layer-0 feature moves the logits by its edges;
    ablating the error node replaces that MLP output, frozen or not."""
    adp = m.adapter("llama", torch.float64)
    tcs = m.transcoder_set(adp, "transcoder", layers=[0])
    last, pos = adp.n_layers - 1, PROMPT.shape[1] - 1
    result = attribute(adp, tcs, PROMPT)
    lay = result.layout
    clean = adp(PROMPT)[0, -1]
    feats = [(i, n) for i, n in enumerate(result.nodes[lay.features]) if n.pos == pos]
    assert feats
    for col, node in feats[:3]:
        iv = FeatureIntervention(node.layer, pos, node.feature, value=0.0)
        new = intervene(adp, tcs, PROMPT, [iv]).logits[0, -1]
        for row, logit in enumerate(result.nodes[lay.logits]):
            v = logit.token_id
            moved = (new[v] - new.mean()) - (clean[v] - clean.mean())
            edge = result.adjacency[lay.logits.start + row, col]
            assert float(moved) == pytest.approx(-float(edge), abs=1e-9)
    err = Node(f"err_{last}_{pos}", NodeKind.ERROR, last, pos)
    err_col = next(i for i, n in enumerate(result.nodes) if n.kind is NodeKind.ERROR
                   and n.layer == last and n.pos == pos)  # fmt: skip
    frozen = ablate(adp, tcs, PROMPT, [err], freeze_attention=True).logits[0, -1]
    for row, logit in enumerate(result.nodes[lay.logits]):
        v = logit.token_id
        moved = (frozen[v] - frozen.mean()) - (clean[v] - clean.mean())
        assert float(moved) == pytest.approx(
            -float(result.adjacency[lay.logits.start + row, err_col]), abs=1e-9
        )

    def zero_last_position(x: torch.Tensor) -> torch.Tensor:
        out = adp.mlp(last, x).clone()
        out[:, pos] = 0.0
        return out

    # Not frozen: the real model with that MLP output zeroed (layer 0's transcoder plus
    # its clean error is its MLP output, and nothing upstream of the ablation changes).
    expected = adp(PROMPT, mlp_replacements={last: zero_last_position})
    assert torch.allclose(ablate(adp, tcs, PROMPT, [err]).logits, expected, atol=1e-10)


def test_bad_interventions(setup) -> None:
    adp, tcs = setup
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        FeatureIntervention(0, 0, 0, value=1.0, scale=2.0)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        intervene(adp, tcs, PROMPT, [FeatureIntervention(0, 99, 0, value=1.0)])
    node = Node("err_0_1", NodeKind.ERROR, 0, 1)
    with pytest.raises(InvalidArgumentError, match="counterfactual"):
        ablate(adp, tcs, PROMPT, [node], mode="patch")
    with pytest.raises(InvalidArgumentError, match="same length"):
        ablate(adp, tcs, PROMPT, [node], mode="patch", counterfactual_ids=COUNTER[:, :4])
    with pytest.raises(InvalidArgumentError, match="unknown ablation mode"):
        ablate(adp, tcs, PROMPT, [node], mode="noise")  # type: ignore[arg-type]
    logit = Node("3_5_6", NodeKind.LOGIT, 2, 6, token_id=5)
    with pytest.raises(InvalidArgumentError, match="only features"):
        ablate(adp, tcs, PROMPT, [logit])
