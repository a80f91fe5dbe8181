"""Unit tests of the service's pure parts: error mapping, page tokens, config, converters."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from ingest import errors
from ingest.store.base import FeatureOccurrence, GraphStatus, GraphSummary
from service import convert
from service.config import ServerConfig, is_loopback, load_tokens
from service.errors import INTERNAL_MESSAGE, STATUS_BY_ERROR, status_for
from service.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_page_token,
    encode_page_token,
    page_size,
)
from tests.service import builders

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
        (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
        (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
        (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_each_domain_error_maps_to_one_status(
    error: type[Exception], code: grpc.StatusCode
) -> None:
    assert status_for(error("what to do")) == (code, "what to do")


def test_every_domain_error_class_is_mapped() -> None:
    classes = {
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.CircuitscopeError)
    }
    assert classes - {errors.CircuitscopeError} == set(STATUS_BY_ERROR)


def test_a_message_echoing_a_huge_value_keeps_its_advice() -> None:
    huge = errors.NotFoundError(f"graph {'x' * 100_000!r} is not stored; ListGraphs lists them")
    code, message = status_for(huge)
    assert code is grpc.StatusCode.NOT_FOUND and len(message) == 1000
    assert message.startswith("graph 'xxx") and message.endswith("; ListGraphs lists them")


def test_an_unimplemented_method_is_unimplemented_not_internal() -> None:
    code, message = status_for(NotImplementedError("Method not implemented!"))
    assert code is grpc.StatusCode.UNIMPLEMENTED and "does not implement" in message
    # a library's NotImplementedError inside a handler is an internal error
    code, message = status_for(NotImplementedError("aten::foo is not implemented for MPS"))
    assert code is grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE


def test_unexpected_errors_hide_their_details() -> None:
    code, message = status_for(KeyError("/secret/path in module _internal"))
    assert code is grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE
    assert status_for(errors.CircuitscopeError("base"))[0] is grpc.StatusCode.INTERNAL


def test_page_size_default_clamp_and_negative() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE
    assert page_size(7) == 7
    assert page_size(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE
    with pytest.raises(errors.InvalidArgumentError):
        page_size(-1)


def test_page_token_round_trip_and_rejections() -> None:
    filters = {"task": "ioi", "model_id": None}
    token = encode_page_token("cursor|42", filters)
    assert decode_page_token(token, filters) == "cursor|42"
    assert encode_page_token(None, filters) == "" and decode_page_token("", filters) is None
    for bad in ("@@", "Zm9v", token[:-3], "x" * 5000):
        with pytest.raises(errors.InvalidArgumentError):
            decode_page_token(bad, filters)
    with pytest.raises(errors.InvalidArgumentError, match="other filters"):
        decode_page_token(token, {"task": "other", "model_id": None})


def test_server_config_validation(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(errors.InvalidArgumentError, match="without bearer tokens"):
        ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", tokens=frozenset({"t" * 20}))
    with pytest.raises(errors.InvalidArgumentError):
        ServerConfig(port=70000)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# ops\n" + "a" * 20 + "\n\n" + "b" * 20 + "  # ci\n")
    assert load_tokens("c" * 20 + ", ", tokens_file) == {"a" * 20, "b" * 20, "c" * 20}
    with pytest.raises(errors.InvalidArgumentError, match="shorter than 16"):
        load_tokens("short", None)
    with pytest.raises(errors.NotFoundError):
        load_tokens(None, tmp_path / "missing")


@pytest.mark.parametrize(
    "field",
    ["graph_cache_edges", "graph_cache_revalidate_s", "list_cache_ttl_s", "subgraph_memo_edges"],
)
def test_cache_settings_must_not_be_negative(field: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=field):
        ServerConfig(**{field: -1})  # type: ignore[arg-type]
    assert getattr(ServerConfig(**{field: 0}), field) == 0  # type: ignore[arg-type]


def test_serve_flags_set_the_cache_settings() -> None:
    import argparse

    from service import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    flags = [
        "serve",
        "--graph-cache-edges",
        "1000",
        "--graph-cache-revalidate",
        "0",
        "--list-cache-ttl",
        "2.5",
        "--subgraph-memo-edges",
        "0",
    ]
    config = serve_cli.build_server_config(parser.parse_args(flags), {})
    assert (config.graph_cache_edges, config.graph_cache_revalidate_s) == (1000, 0.0)
    assert (config.list_cache_ttl_s, config.subgraph_memo_edges) == (2.5, 0)
    defaults = serve_cli.build_server_config(parser.parse_args(["serve"]), {})
    for field in (
        "graph_cache_edges",
        "graph_cache_revalidate_s",
        "list_cache_ttl_s",
        "subgraph_memo_edges",
    ):
        assert getattr(defaults, field) == getattr(ServerConfig(), field), field


def test_graph_round_trips_through_proto() -> None:
    graph = builders.layered_graph("g", n_layers=2, width=3)
    # what an ingest records with a prompt travels too (strings and nulls exactly)
    graph.metadata.extra = {"counterfactual": "The war ended", "prompt_id": "p7", "x": None}
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    updated = datetime(2026, 1, 3, 0, 0, 0, tzinfo=UTC)
    summary = GraphSummary(
        graph.metadata, GraphStatus.COMPLETE, graph.n_nodes, graph.n_edges, created, updated
    )
    message = convert.graph_to_proto(graph, summary)
    back = convert.graph_from_proto(type(message).FromString(message.SerializeToString()))
    assert back.nodes == graph.nodes
    assert back.metadata == graph.metadata
    np.testing.assert_array_equal(back.sources, graph.sources)
    np.testing.assert_array_equal(back.targets, graph.targets)
    np.testing.assert_array_equal(back.weights, graph.weights)
    assert convert.summary_from_proto(convert.stored_summary_to_proto(summary)) == summary
    assert convert.summary_from_proto(message.summary) == summary


def test_feature_and_occurrence_round_trip() -> None:
    for feature in builders.features(2, 3):
        back = convert.feature_from_proto(convert.feature_to_proto(feature))
        assert back == feature
        assert type(back.top_examples[0]["position"]) is int
    occ = FeatureOccurrence("g", "0_1_2", 2, 0.5, None)
    assert convert.occurrence_from_proto(convert.occurrence_to_proto(occ)) == occ


def test_unknown_enum_values_are_invalid_arguments() -> None:
    with pytest.raises(errors.InvalidArgumentError):
        convert.direction_from_proto(99)
    with pytest.raises(errors.InvalidArgumentError):
        convert.path_score_from_proto(-4)


def test_cli_prints_file_system_errors_as_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest.zoo import cli as zoo_cli
    from service.cli import main

    # an OSError no command checked for (here a full disk while listing): one line
    # naming the file, exit 2, no traceback
    def full_disk(args: object) -> int:
        raise OSError(28, "No space left on device", "/data/zoo/out.json")

    monkeypatch.setattr(zoo_cli, "_list", full_disk)
    code = main(["zoo", "list"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err == "circuitscope: error: /data/zoo/out.json: No space left on device\n"


@pytest.mark.parametrize(
    ("argv", "count"),
    [
        (["db", "status"], 0),
        (["-v", "db", "status"], 1),
        (["db", "status", "-vv"], 2),
        (["transcoders", "eval", "set", "--model", "m", "--verbose"], 1),
        (["query", "graphs", "list", "-v"], 1),
        (["query", "-v", "graphs", "list"], 1),
    ],
)
def test_verbose_goes_before_or_after_the_command(argv: list[str], count: int) -> None:
    from service.cli import build_parser

    assert build_parser().parse_args(argv).verbose == count


def test_served_models_name_their_store_ids_before_and_after_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.models import ModelRegistry, ModelSpec

    (tmp_path / "zoo" / "m").mkdir(parents=True)
    (tmp_path / "tc").mkdir()
    monkeypatch.chdir(tmp_path)
    registry = ModelRegistry([ModelSpec.parse("local=./zoo/m,tc"), ModelSpec.parse("hub=gpt2,tc")])
    # the ids graphs are stored under: a local checkpoint by its absolute path
    assert registry.model_id("local") == str((tmp_path / "zoo" / "m").resolve())
    assert registry.model_id("hub") == "gpt2"
    # the set's catalog id needs its weights: unknown until the model is loaded
    assert not registry.is_loaded("local") and registry.set_id("local") is None


def test_faithfulness_round_trips_with_its_warning() -> None:
    from ingest.attribution.faithfulness import FaithfulnessCurve

    curve = FaithfulnessCurve("attribution", [0.5, 1.0], [41.0, 1.0], [3, 6], 12.33, 12.21,
                              -11.66)  # fmt: skip
    back = convert.faithfulness_from_proto(convert.faithfulness_to_proto(curve))
    assert back.warning == curve.warning() and back.warning
    assert back.metric_counterfactual == -11.66 and back.faithfulness == [41.0, 1.0]
    unknown = dataclasses.replace(curve, m_counterfactual=None)
    back = convert.faithfulness_from_proto(convert.faithfulness_to_proto(unknown))
    assert back.metric_counterfactual is None and back.warning is None


def test_model_spec_refuses_a_missing_transcoder_directory(tmp_path: Path) -> None:
    from service.models import ModelSpec

    (tmp_path / "tc").mkdir()
    spec = ModelSpec.parse(f"m=gpt2,{tmp_path / 'tc'}")
    assert (spec.name, spec.model_path, spec.transcoders_path) == ("m", "gpt2", tmp_path / "tc")
    with pytest.raises(errors.NotFoundError, match=r"no transcoder set directory at .*missing"):
        ModelSpec.parse(f"m=gpt2,{tmp_path / 'missing'}")
    # a model written as a path must exist (a hub id such as gpt2 is looked up on load)
    with pytest.raises(errors.NotFoundError, match=r"no model directory at .*nope"):
        ModelSpec.parse(f"m={tmp_path / 'nope'},{tmp_path / 'tc'}")
    assert ModelSpec.parse(f"m={tmp_path},{tmp_path / 'tc'}").model_path == str(tmp_path)
