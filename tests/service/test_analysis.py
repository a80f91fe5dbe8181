"""AnalysisService end to end: attribution on a tiny real GPT-2 served from disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.attribution.attribute import attribute
from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.models import load_model
from ingest.store.base import GraphStore
from ingest.transcoders.formats import load_any, save
from service.client import CircuitsClient
from service.config import ServerConfig
from service.models import ModelSpec
from service.server import serve_in_background
from tests.ingest.attribution import models as tiny
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration
PROMPT = "w2 w5 w7 w3"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served-model")
    hf = tiny.hf_model("gpt2", seed=3)
    hf.save_pretrained(root / "model")
    tiny.word_tokenizer().save_pretrained(root / "model")
    adapter = load_model(str(root / "model")).adapter
    save(tiny.transcoder_set(adapter, seed=3), root / "transcoders")
    return root / "model", root / "transcoders"


@pytest.fixture(scope="module")
def analysis_client(store: GraphStore, model_dirs: tuple[Path, Path]) -> Iterator[CircuitsClient]:
    spec = ModelSpec("tiny-gpt2", str(model_dirs[0]), model_dirs[1])
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), models=(spec,))
    with (
        serve_in_background(config, store) as running,
        CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN, timeout_s=120) as client,
    ):
        yield client


def test_served_attribution_equals_the_library_result(
    analysis_client: CircuitsClient, model_dirs: tuple[Path, Path]
) -> None:
    assert analysis_client.list_models() == ["tiny-gpt2"]
    served = analysis_client.attribute("tiny-gpt2", PROMPT, node_threshold=0.9)
    loaded = load_model(str(model_dirs[0]))
    direct = attribute(loaded, load_any(model_dirs[1]), PROMPT).to_graph(
        pruned=True, node_threshold=0.9, edge_threshold=0.98
    )
    assert [n.node_id for n in served.graph.nodes] == [n.node_id for n in direct.nodes]
    served_edges = {(s, t): w for s, t, w in served.graph.edge_list()}
    direct_edges = {(s, t): w for s, t, w in direct.edge_list()}
    assert served_edges.keys() == direct_edges.keys()
    assert list(served_edges.values()) == pytest.approx(list(direct_edges.values()), rel=1e-5)
    assert served.graph.metadata.tokens == ["w2", "w5", "w7", "w3"]
    assert served.full_node_count >= served.graph.n_nodes


def test_logit_difference_and_feature_targets(analysis_client: CircuitsClient) -> None:
    diff = analysis_client.attribute("tiny-gpt2", PROMPT, logit_diff=(5, 9))
    logits = [n for n in diff.graph.nodes if n.kind == "logit"]
    assert [n.token_id for n in logits] == [5]
    with pytest.raises(InvalidArgumentError, match="correct"):
        analysis_client.attribute("tiny-gpt2", PROMPT, logit_diff=(10_000, 9))
    base = analysis_client.attribute("tiny-gpt2", PROMPT, node_threshold=1.0)
    last = max(n.pos for n in base.graph.nodes)
    chosen = next(n for n in base.graph.nodes if n.kind == "feature" and n.pos == last)
    assert chosen.layer is not None and chosen.feature is not None
    explained = analysis_client.attribute(
        "tiny-gpt2", PROMPT, feature=(chosen.layer, chosen.feature, last), node_threshold=1.0
    )
    assert chosen.node_id in {n.node_id for n in explained.graph.nodes}
    assert not [n for n in explained.graph.nodes if n.kind == "logit"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"model": "no-such-model"}, NotFoundError),
        ({"model": ""}, InvalidArgumentError),
        ({"prompt": ""}, InvalidArgumentError),
        ({"prompt": "w2 " * 2000}, InvalidArgumentError),
        ({"node_threshold": 1.2}, InvalidArgumentError),
        ({"max_feature_nodes": 0}, InvalidArgumentError),
        ({"max_n_logits": 101}, InvalidArgumentError),
    ],
)
def test_bad_attribution_requests(
    analysis_client: CircuitsClient, kwargs: dict[str, object], error: type[Exception]
) -> None:
    args: dict[str, object] = {"model": "tiny-gpt2", "prompt": PROMPT, **kwargs}
    with pytest.raises(error):
        analysis_client.attribute(**args)  # type: ignore[arg-type]
