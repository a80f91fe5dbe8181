"""attribute() as a library call: the ids its graphs carry and the targets it accepts.

A graph computed from Python must land in the store under the ids ingest and the server
use (the set's catalog id), get the same graph id when computed again, and refuse
targets it would otherwise read wrongly.
"""

import pytest
import torch

from ingest.attribution.artifact import load_artifact, save_artifact
from ingest.attribution.attribute import attribute
from ingest.attribution.result import AttributionResult
from ingest.attribution.targets import FeatureTarget, LogitDiffTarget, LogitTargets
from ingest.errors import InvalidArgumentError
from ingest.graph import Node, NodeKind

from . import models as m

pytestmark = pytest.mark.unit

PROMPT = [3, 17, 8, 25, 11, 3, 30]


def _target_node(result: AttributionResult) -> Node:
    """The feature node a FeatureTarget graph explains (the one node of weight 1)."""
    assert result.node_weights is not None
    weights = result.node_weights.tolist()
    (node,) = [n for n, w in zip(result.nodes, weights, strict=True) if w]
    return node


def test_graphs_carry_the_catalog_set_id_and_the_given_model_id() -> None:
    adp = m.adapter("neox", torch.float32)
    tcs = m.transcoder_set(adp)
    result = attribute(adp, tcs, PROMPT, model_id="my-checkpoint")
    meta = result.to_graph().metadata
    assert meta.set_id == tcs.catalog_id
    assert meta.set_id.startswith(f"{tcs.metadata.set_id}@")
    assert meta.model_id == "my-checkpoint"
    assert attribute(adp, tcs, PROMPT, set_id="mine").metadata.set_id == "mine"


def test_the_catalog_id_follows_the_weights() -> None:
    """The hash is cached, yet an in-place change to any weight gives a new id, and the
    same weights give the same id at another dtype."""
    adp = m.adapter("neox", torch.float32)
    tcs = m.transcoder_set(adp)
    before = tcs.catalog_id
    assert tcs.catalog_id == before
    tcs.to(dtype=torch.float64)
    assert tcs.catalog_id == before
    with torch.no_grad():
        tcs.W_enc(tcs.layers[-1])[0, 0] += 1.0
    assert tcs.catalog_id != before
    assert tcs.catalog_id.split("@")[0] == before.split("@")[0]


def test_the_same_graph_gets_the_same_id() -> None:
    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp)
    first = attribute(adp, tcs, PROMPT).metadata.graph_id
    assert attribute(adp, tcs, PROMPT).metadata.graph_id == first
    others = {
        attribute(adp, tcs, PROMPT[:-1]).metadata.graph_id,
        attribute(adp, tcs, PROMPT, target=LogitDiffTarget(5, 9)).metadata.graph_id,
        attribute(adp, tcs, PROMPT, target=LogitTargets(max_n_logits=2)).metadata.graph_id,
        attribute(adp, tcs, PROMPT, max_feature_nodes=3).metadata.graph_id,
        attribute(adp, tcs, PROMPT, model_id="another").metadata.graph_id,
        attribute(adp, tcs, PROMPT, graph_id="given").metadata.graph_id,
    }
    assert first not in others and len(others) == 6


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: LogitDiffTarget("58", 20), "single_token_id"),  # text is not an id
        (lambda: LogitDiffTarget(5, -1), "counterfactual must be an int >= 0"),
        (lambda: LogitDiffTarget(True, 2), "correct must be an int >= 0"),
        (lambda: FeatureTarget(1, 2.0), "index must be an int >= 0"),  # type: ignore[arg-type]
        (lambda: FeatureTarget(-1, 2), "layer must be an int >= 0"),
        (lambda: FeatureTarget(1, 2, "3"), "pos must be an int >= 0"),  # type: ignore[arg-type]
    ],
)
def test_targets_refuse_what_is_not_an_id(make, named: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError, match=named):
        make()


def test_attribute_refuses_a_target_of_another_type() -> None:
    adp = m.adapter("neox", torch.float32)
    tcs = m.transcoder_set(adp)
    with pytest.raises(InvalidArgumentError, match="target must be a LogitTargets"):
        attribute(adp, tcs, PROMPT, target="logits")  # type: ignore[arg-type]


def test_a_feature_target_at_the_bos_position_is_refused() -> None:
    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp)
    with pytest.raises(InvalidArgumentError, match="beginning-of-sequence"):
        attribute(adp, tcs, [0, *PROMPT], target=FeatureTarget(1, 0, 0))
    # without a BOS, position 0 is an ordinary position
    graph = attribute(adp, tcs, PROMPT, target=FeatureTarget(1, 0, 0))
    target = _target_node(graph)
    assert target.kind is NodeKind.FEATURE and target.pos == 0


def test_saving_an_artifact_records_where_it_lives(tmp_path) -> None:  # type: ignore[no-untyped-def]
    adp = m.adapter("neox", torch.float32)
    tcs = m.transcoder_set(adp)
    result = attribute(adp, tcs, PROMPT)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        save_artifact(result, tmp_path / "taken")
    assert result.metadata.artifact_uri is None  # a failed save records nothing
    save_artifact(result, tmp_path / "graph")
    uri = (tmp_path / "graph").resolve().as_uri()
    assert result.to_graph().metadata.artifact_uri == uri
    assert load_artifact(tmp_path / "graph").metadata.artifact_uri == uri


def test_interventions_and_exports_name_a_wrong_argument(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ingest.attribution.export import export_circuit_tracer_json
    from ingest.attribution.interventions import intervene

    adp = m.adapter("neox", torch.float32)
    tcs = m.transcoder_set(adp)
    with pytest.raises(InvalidArgumentError, match=r"input_ids must be a .* got str.*tokenize"):
        intervene(adp, tcs, "some text", [])  # type: ignore[arg-type]
    result = attribute(adp, tcs, PROMPT)
    with pytest.raises(InvalidArgumentError, match=r"takes an AttributionGraph.*to_graph"):
        export_circuit_tracer_json(result, tmp_path / "g.json")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="is a directory: give a file path"):
        export_circuit_tracer_json(result.to_graph(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    export_circuit_tracer_json(result.to_graph(), tmp_path / "g.json")
    assert (tmp_path / "g.json").stat().st_size > 0


def test_an_inactive_feature_target_reads_zero_not_minus_zero() -> None:
    import math

    from ingest.attribution.replacement import build_replacement

    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp, arch="batchtopk")  # pre * (pre > threshold): -0.0 below
    state = build_replacement(adp, tcs, torch.tensor([PROMPT]))
    pre = tcs.pre_activations(1, state.mlp_in[1][0, -1])
    index = int(torch.nonzero((pre < 0) & (state.activations[1][-1] == 0)).flatten()[0])
    result = attribute(adp, tcs, PROMPT, target=FeatureTarget(1, index))
    target = _target_node(result)
    assert target.activation == 0.0 and math.copysign(1.0, target.activation) == 1.0


def test_the_set_id_is_hashed_as_loaded_whatever_the_model_dtype() -> None:
    """attribute() moves the set to the model's dtype; a narrower one rounds the weights,
    so the id is taken before the move, as ingest and the server take it."""
    narrow = m.adapter("neox", torch.bfloat16)
    tcs = m.transcoder_set(narrow).to(torch.float32)
    with torch.no_grad():  # weights bfloat16 cannot hold, as a float32 set's are
        for weight in tcs.parameters():
            weight.mul_(1 + 1e-4 * torch.rand_like(weight))
    loaded_id = tcs.catalog_id
    assert attribute(narrow, tcs, PROMPT).metadata.set_id == loaded_id
    assert tcs.catalog_id != loaded_id  # rounded to bfloat16: another hash, seen at once


def test_numpy_ids_and_inference_tensors_are_taken() -> None:
    import numpy as np

    adp = m.adapter("neox", torch.float64)
    tcs = m.transcoder_set(adp)
    plain = attribute(adp, tcs, PROMPT, target=LogitDiffTarget(5, 9))
    target = LogitDiffTarget(np.int64(5), np.int64(9))  # type: ignore[arg-type]
    assert type(target.correct) is int
    assert attribute(adp, tcs, PROMPT, target=target).metadata.graph_id == plain.metadata.graph_id
    with torch.inference_mode():
        frozen = m.transcoder_set(m.adapter("neox", torch.float32))
    assert frozen.catalog_id == frozen.catalog_id.split("@")[0] + "@" + frozen.fingerprint()[:12]
