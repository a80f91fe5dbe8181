"""AnalysisService and JobService end to end: a tiny real GPT-2 served from disk."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.models import load_model
from ingest.transcoders.formats import load_any
from service.cli import main
from service.client import CircuitsClient
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration
PROMPT = "w2 w5 w7 w3"


@pytest.fixture(scope="module")
def analysis_client(analysis_target: str) -> Iterator[CircuitsClient]:
    with CircuitsClient(analysis_target, token=TOKEN, timeout_s=120) as client:
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
    # the ids ingest stores the model's graphs and the set's features under
    (model,) = analysis_client.served_models()
    assert model.loaded and model.model_id == str(model_dirs[0].resolve())
    assert served.graph.metadata.set_id == model.set_id == load_any(model_dirs[1]).catalog_id
    assert served.graph.metadata.model_id == model.model_id
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


def test_ingest_job_stores_graphs_and_reports_progress(
    analysis_client: CircuitsClient,
) -> None:
    prompts = [
        {"prompt": "w4 w9", "correct": "w2 w3", "incorrect": "w5"},  # two-token answer
        {"prompt": "w4 w9 w2 w11", "task": "job-test", "id": "p1"},
    ]
    job = analysis_client.submit_ingest("tiny-gpt2", prompts, node_threshold=0.9)
    assert job.prompt_count == 2 and job.state in ("queued", "running")
    updates = list(analysis_client.watch_job(job.job_id))
    final = updates[-1]
    assert final.state == "succeeded" and final.processed_count == 2
    assert [u.processed_count for u in updates] == sorted(u.processed_count for u in updates)
    assert len(final.graph_ids) == 1
    assert len(final.errors) == 1 and final.errors[0].startswith("prompt 1:")
    assert analysis_client.get_job(job.job_id) == final

    stored = analysis_client.get_graph(final.graph_ids[0])
    assert stored.metadata.task == "job-test" and stored.metadata.node_threshold == 0.9
    assert stored.metadata.extra["line"] == 2  # the prompt's number in the job
    assert stored.metadata.artifact_uri
    full = analysis_client.get_graph(final.graph_ids[0], node_threshold=1.0, edge_threshold=1.0)
    assert full.n_edges >= stored.n_edges

    again = analysis_client.submit_ingest("tiny-gpt2", prompts[1:], node_threshold=0.9)
    done = list(analysis_client.watch_job(again.job_id))[-1]
    assert done.state == "succeeded" and done.graph_ids == [] and done.already_stored_count == 1


def test_cancelled_job_stops_before_its_last_prompt(analysis_client: CircuitsClient) -> None:
    blocker = analysis_client.submit_ingest("tiny-gpt2", [{"prompt": "w6 w7 w8"}])
    many = [{"prompt": f"w{2 + i % 30} w{3 + i % 30} w4"} for i in range(20)]
    job = analysis_client.submit_ingest("tiny-gpt2", many)
    cancelled = analysis_client.cancel_job(job.job_id)
    assert cancelled.job_id == job.job_id
    final = list(analysis_client.watch_job(job.job_id))[-1]
    assert final.state == "cancelled" and final.processed_count < 20
    assert list(analysis_client.watch_job(blocker.job_id))[-1].state == "succeeded"
    assert analysis_client.cancel_job(job.job_id).state == "cancelled"


def test_list_jobs_pages_newest_first_with_filters(analysis_client: CircuitsClient) -> None:
    mine = []
    for i in range(3):
        job = analysis_client.submit_ingest("tiny-gpt2", [{"prompt": f"w{10 + i} w3 w7"}])
        mine.append(job.job_id)
        list(analysis_client.watch_job(job.job_id))
    seen, token, pages = [], "", 0
    while True:
        page = analysis_client.list_jobs(page_size=2, page_token=token)
        assert len(page.items) <= 2
        seen += page.items
        pages += 1
        if page.next_cursor is None:
            break
        token = page.next_cursor
    ids = [j.job_id for j in seen]
    assert len(set(ids)) == len(ids) and pages == -(-len(ids) // 2)
    assert [i for i in ids if i in mine] == mine[::-1]  # newest first
    assert all(j.graph_ids == [] and j.errors == [] and j.prompt_count >= 1 for j in seen)
    assert {j.job_id for j in seen} == {j.job_id for j in analysis_client.iter_jobs()}
    succeeded = list(analysis_client.iter_jobs(state="succeeded", model="tiny-gpt2"))
    assert {j.state for j in succeeded} == {"succeeded"} and set(mine) <= {
        j.job_id for j in succeeded
    }
    assert analysis_client.list_jobs(model="no-such-model").items == []


def _raw_list_jobs(target: str, **fields: object) -> None:
    import grpc

    from service._generated.circuits.v1 import job_service_pb2, job_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        stub.ListJobs(
            job_service_pb2.ListJobsRequest(**fields),  # type: ignore[arg-type]
            metadata=[("authorization", f"Bearer {TOKEN}")],
            timeout=10,
        )


def test_bad_list_jobs_requests_are_invalid_arguments(
    analysis_client: CircuitsClient, analysis_target: str
) -> None:
    import grpc

    from service.pagination import encode_page_token

    with pytest.raises(InvalidArgumentError, match="page_size"):
        analysis_client.list_jobs(page_size=-1)
    with pytest.raises(InvalidArgumentError, match="page_token"):
        analysis_client.list_jobs(page_token="not-a-token")
    page = analysis_client.list_jobs(page_size=1)
    assert page.next_cursor is not None
    with pytest.raises(InvalidArgumentError, match="page_token"):  # issued for other filters
        analysis_client.list_jobs(page_token=page.next_cursor, state="failed")
    with pytest.raises(InvalidArgumentError, match="unknown job state"):
        analysis_client.list_jobs(state="done")
    naive = encode_page_token(["2026-01-01T00:00:00", "x"], {"state": 0, "model": ""})
    for fields in ({"state": 99}, {"page_token": naive}):
        with pytest.raises(grpc.RpcError) as caught:
            _raw_list_jobs(analysis_target, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get_job("no-such-job"), NotFoundError),
        (lambda c: c.cancel_job(""), InvalidArgumentError),
        (lambda c: c.submit_ingest("no-such-model", [{"prompt": "w2"}]), NotFoundError),
        (lambda c: c.submit_ingest("tiny-gpt2", []), InvalidArgumentError),
        (lambda c: c.submit_ingest("tiny-gpt2", [{"prompt": " "}]), InvalidArgumentError),
        (
            lambda c: c.submit_ingest("tiny-gpt2", [{"prompt": "w2"}], edge_threshold=2.0),
            InvalidArgumentError,
        ),
    ],
)
def test_bad_job_requests(analysis_client: CircuitsClient, call, error) -> None:
    with pytest.raises(error):
        call(analysis_client)


def test_query_commands_for_models_attribution_and_jobs(
    analysis_client: CircuitsClient,
    analysis_target: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CIRCUITSCOPE_TOKEN", TOKEN)
    base = ["query", "--target", analysis_target, "--timeout", "120"]
    assert main([*base, "models"]) == 0
    (model,) = json.loads(capsys.readouterr().out)
    assert model == dataclasses.asdict(analysis_client.served_models()[0])
    assert model["name"] == "tiny-gpt2" and model["set_id"].startswith("tiny")
    assert main([*base, "attribute", "tiny-gpt2", PROMPT, "--node-threshold", "0.9"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["graph"]["metadata"]["prompt"] == PROMPT and result["graph"]["edges"]
    # token ids as id:N, as `circuitscope attribute` names ids (bare "5" would be text there)
    assert main([*base, "attribute", "tiny-gpt2", PROMPT, "--logit-diff", "id:5", "id:9"]) == 0
    logits = [
        n for n in json.loads(capsys.readouterr().out)["graph"]["nodes"] if n["kind"] == "logit"
    ]
    assert [(n["token_id"], n["label"]) for n in logits] == [(5, "logit diff 5 - 9")]
    # LAYER INDEX POS, as node ids: feature 3 at position 1 of layer 0
    assert main([*base, "intervene", "tiny-gpt2", PROMPT, "--scale", "0", "3", "1", "0"]) == 0
    changed = json.loads(capsys.readouterr().out)
    direct = analysis_client.intervene("tiny-gpt2", PROMPT, [(0, 1, 3, "scale", 0.0)])
    assert changed == json.loads(json.dumps(dataclasses.asdict(direct)))
    assert len(changed["clean"]) == 10 and len(changed["clean_after"]) == 10
    evaluate = [*base, "evaluate", "tiny-gpt2", PROMPT, "w9 w5 w7 w3", "5", "9"]
    assert main([*evaluate, "--fractions", "0.5", "1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w3 w8 w13", "task": "cli-job"}\n# comment\n')
    assert main([*base, "jobs", "submit", "tiny-gpt2", str(prompts), "--watch"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "succeeded" and len(job["graph_ids"]) == 1
    assert main([*base, "jobs", "list", "--state", "succeeded", "--page-size", "1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in listed["items"]] == [job["job_id"]]  # the newest
    # ListJobs leaves graph ids and errors out, and so does the listing
    assert "graph_ids" not in listed["items"][0] and "errors" not in listed["items"][0]
    assert "next_page_token" in listed


def test_intervene_matches_the_library_and_the_model(
    analysis_client: CircuitsClient, model_dirs: tuple[Path, Path]
) -> None:
    import torch

    from ingest.attribution.interventions import FeatureIntervention, intervene
    from ingest.attribution.prompts import tokenize

    loaded = load_model(str(model_dirs[0]))
    transcoders = load_any(model_dirs[1])
    adapter = loaded.adapter
    ids = tokenize(loaded.tokenizer, PROMPT, adapter.vocab_size, adapter.n_ctx)
    base = analysis_client.attribute("tiny-gpt2", PROMPT, node_threshold=1.0)
    last = ids.shape[1] - 1
    feature = next(n for n in base.graph.nodes if n.kind == "feature" and n.pos == last)
    assert feature.layer is not None and feature.feature is not None
    change = (feature.layer, last, feature.feature, "scale", 0.0)

    served = analysis_client.intervene("tiny-gpt2", PROMPT, [change], top_k=5)
    with torch.no_grad():
        model_logits = adapter(ids)[0, -1]  # (V,) the unchanged model
    clean_ids = [p.token_id for p in served.clean]
    assert clean_ids == model_logits.topk(5).indices.tolist()
    assert [p.logit for p in served.clean] == pytest.approx(
        model_logits[clean_ids].tolist(), abs=1e-4
    )
    direct = intervene(
        adapter,
        transcoders,
        ids,
        [FeatureIntervention(feature.layer, last, feature.feature, scale=0.0)],
        freeze_attention=False,
    ).logits[0, -1]
    assert [p.logit for p in served.clean_after] == pytest.approx(
        direct[clean_ids].tolist(), abs=1e-4
    )
    assert [p.token_id for p in served.intervened] == direct.topk(5).indices.tolist()
    from_iterator = analysis_client.intervene("tiny-gpt2", PROMPT, iter([change]), top_k=5)
    assert from_iterator.intervened == served.intervened  # an iterator is read once, whole
    unchanged = analysis_client.intervene(
        "tiny-gpt2", PROMPT, [(*change[:3], "scale", 1.0)], top_k=5
    )
    assert [p.logit for p in unchanged.clean_after] == pytest.approx(
        [p.logit for p in unchanged.clean], abs=1e-5
    )


def test_evaluate_circuit_is_fully_faithful_with_every_edge(
    analysis_client: CircuitsClient,
) -> None:
    counterfactual = "w9 w5 w7 w3"
    for scoring in ("attribution", "random"):
        curve = analysis_client.evaluate_circuit(
            "tiny-gpt2", PROMPT, counterfactual, 5, 9, scoring=scoring, fractions=[0.1, 0.5, 1.0]
        )
        assert curve.fractions == [0.1, 0.5, 1.0]
        assert curve.edge_counts == sorted(curve.edge_counts) and curve.edge_counts[0] >= 1
        assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
        assert curve.metric_full != curve.metric_empty
        assert curve.cmd >= 0.0 and curve.cpr == pytest.approx(
            sum(
                (b - a) * (fa + fb) / 2
                for a, b, fa, fb in zip(
                    curve.fractions,
                    curve.fractions[1:],
                    curve.faithfulness,
                    curve.faithfulness[1:],
                    strict=False,
                )
            )
        )


@pytest.mark.parametrize(
    ("scoring", "patching"),
    [("weight", "edge"), ("eap_signed", "edge"), ("eap", "node"), ("random", "node")],
)
def test_evaluate_circuit_serves_every_scoring_and_patching_like_the_library(
    analysis_client: CircuitsClient, model_dirs: tuple[Path, Path], scoring: str, patching: str
) -> None:
    from ingest.attribution.faithfulness import compare_methods, logit_diff_metric
    from ingest.attribution.prompts import tokenize
    from ingest.attribution.targets import LogitDiffTarget

    counterfactual = "w9 w5 w7 w3"
    fractions = [0.1, 0.5, 1.0]
    served = analysis_client.evaluate_circuit(
        "tiny-gpt2", PROMPT, counterfactual, 5, 9, scoring=scoring, patching=patching,
        fractions=fractions,
    )  # fmt: skip
    loaded = load_model(str(model_dirs[0]))
    transcoders = load_any(model_dirs[1])
    adapter = loaded.adapter
    ids = tokenize(loaded.tokenizer, PROMPT, adapter.vocab_size, adapter.n_ctx)
    cf_ids = tokenize(loaded.tokenizer, counterfactual, adapter.vocab_size, adapter.n_ctx)
    result = attribute(loaded, transcoders, PROMPT, target=LogitDiffTarget(5, 9))
    (direct,) = compare_methods(
        adapter, transcoders, result, ids, cf_ids, logit_diff_metric(5, 9),
        methods=[scoring], fractions=fractions, patching=patching,
    )  # fmt: skip
    assert served.faithfulness == pytest.approx(direct.faithfulness, abs=1e-5)
    assert served.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert served.cpr == pytest.approx(direct.cpr, abs=1e-5)
    # the model's own run on the counterfactual, which node patching's m(empty) is
    with torch.no_grad():
        cf_logits = adapter(cf_ids)[0, -1]
    own = float(cf_logits[5] - cf_logits[9])
    assert served.metric_counterfactual == pytest.approx(own, abs=1e-4)
    if patching == "node":
        assert served.metric_empty == pytest.approx(own, abs=1e-4)
    assert served.warning == direct.warning()


def test_unknown_scoring_or_patching_is_invalid(analysis_client: CircuitsClient) -> None:
    with pytest.raises(InvalidArgumentError, match="patching must be one of"):
        analysis_client.evaluate_circuit(
            "tiny-gpt2", PROMPT, "w9 w5 w7 w3", 5, 9, patching="sideways"
        )
    with pytest.raises(InvalidArgumentError, match="scoring must be one of"):
        analysis_client.evaluate_circuit("tiny-gpt2", PROMPT, "w9 w5 w7 w3", 5, 9, scoring="x")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.intervene("tiny-gpt2", PROMPT, []), InvalidArgumentError),
        (
            lambda c: c.intervene("tiny-gpt2", PROMPT, [(99, 0, 0, "scale", 0.0)]),
            InvalidArgumentError,
        ),
        (
            lambda c: c.intervene("tiny-gpt2", PROMPT, [(0, 0, 10**6, "value", 1.0)]),
            InvalidArgumentError,
        ),
        (lambda c: c.intervene("nope", PROMPT, [(0, 0, 0, "value", 1.0)]), NotFoundError),
        # not finite, or past what the model's dtype holds: refused, not an INTERNAL error
        (
            lambda c: c.intervene("tiny-gpt2", PROMPT, [(0, 1, 0, "value", float("nan"))]),
            InvalidArgumentError,
        ),
        (
            lambda c: c.intervene("tiny-gpt2", PROMPT, [(0, 1, 0, "scale", float("inf"))]),
            InvalidArgumentError,
        ),
        (
            lambda c: c.intervene("tiny-gpt2", PROMPT, [(0, 1, 0, "value", 1e308)]),
            InvalidArgumentError,
        ),
        (lambda c: c.evaluate_circuit("tiny-gpt2", PROMPT, "w2 w5", 5, 9), InvalidArgumentError),
        (lambda c: c.evaluate_circuit("tiny-gpt2", PROMPT, "", 5, 9), InvalidArgumentError),
        (
            lambda c: c.evaluate_circuit(
                "tiny-gpt2", PROMPT, "w9 w5 w7 w3", 5, 9, fractions=[0.5, 0.2]
            ),
            InvalidArgumentError,
        ),
        (
            lambda c: c.evaluate_circuit("tiny-gpt2", PROMPT, "w9 w5 w7 w3", 10**6, 9),
            InvalidArgumentError,
        ),
    ],
)
def test_bad_intervention_and_evaluation_requests(
    analysis_client: CircuitsClient, call, error
) -> None:
    with pytest.raises(error):
        call(analysis_client)
