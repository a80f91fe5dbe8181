"""``circuits.v1.AnalysisService``: attribution, interventions and faithfulness on request.

Attribute runs :func:`ingest.attribution.attribute.attribute` and prunes the result
(:meth:`AttributionResult.to_graph`); Intervene runs
:func:`ingest.attribution.interventions.intervene` without and with the requested
changes; EvaluateCircuit attributes the prompt's logit difference and runs
:func:`ingest.attribution.faithfulness.compare_methods` (the MIB protocol) with one edge
scoring. All of it runs in the model pool; nothing runs on the event loop.
The call's deadline cannot interrupt a running computation: a call whose deadline
passes gets DEADLINE_EXCEEDED while the computation finishes in the background.
"""

from __future__ import annotations

import itertools
from typing import Any

from grpc import aio

from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph
from service import convert
from service._generated.circuits.v1 import analysis_service_pb2 as pb
from service._generated.circuits.v1 import analysis_service_pb2_grpc
from service.artifacts import check_threshold
from service.models import ModelRegistry
from service.runner import BlockingRunner
from service.servicers.graphs import bounded

MAX_PROMPT_CHARS = 4096
MAX_FEATURE_NODES = 100_000
MAX_INTERVENTIONS = 1000
MAX_FRACTIONS = 50
_SCORINGS = {
    pb.EDGE_SCORING_UNSPECIFIED: "attribution",
    pb.EDGE_SCORING_ATTRIBUTION: "attribution",
    pb.EDGE_SCORING_RANDOM: "random",
    pb.EDGE_SCORING_EAP: "eap",
    pb.EDGE_SCORING_WEIGHT: "weight",
    pb.EDGE_SCORING_EAP_SIGNED: "eap_signed",
}
_PATCHINGS = {
    pb.CIRCUIT_PATCHING_UNSPECIFIED: "edge",
    pb.CIRCUIT_PATCHING_EDGE: "edge",
    pb.CIRCUIT_PATCHING_NODE: "node",
}
# (token id, token text, logit, probability) of one next-token prediction.
Prediction = tuple[int, str, float, float]


def _check_prompt(prompt: str, what: str = "prompt") -> str:
    if not prompt:
        raise InvalidArgumentError(f"{what} is required")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgumentError(
            f"{what} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
        )
    return prompt


def _check_max_nodes(request: Any) -> int | None:
    if not request.HasField("max_feature_nodes"):
        return None
    value = int(request.max_feature_nodes)
    if not 1 <= value <= MAX_FEATURE_NODES:
        raise InvalidArgumentError(
            f"max_feature_nodes must be in 1..{MAX_FEATURE_NODES}, got {value}"
        )
    return value


def _predictions(tokenizer: Any, logits: Any, token_ids: list[int]) -> list[Prediction]:
    """logits: (V,) of the last position."""
    import torch

    probs = torch.softmax(logits.double(), dim=-1)
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    return [
        (t, str(s), float(logits[t]), float(probs[t]))
        for t, s in zip(token_ids, tokens, strict=True)
    ]


def _intervene(
    registry: ModelRegistry,
    name: str,
    prompt: str,
    changes: list[tuple[int, int, int, float | None, float | None]],
    freeze_attention: bool,
    top_k: int,
) -> tuple[list[Prediction], list[Prediction], list[Prediction]]:
    from ingest.attribution.interventions import FeatureIntervention, intervene
    from ingest.attribution.prompts import tokenize

    model, transcoders = registry.get(name)
    adapter = model.adapter
    ids = tokenize(model.tokenizer, prompt, adapter.vocab_size, adapter.n_ctx)
    ids = ids.to(adapter.device)  # (1, T)
    ivs = [
        FeatureIntervention(layer, pos, index, value, scale)
        for layer, pos, index, value, scale in changes
    ]
    clean = intervene(adapter, transcoders, ids, [], freeze_attention=freeze_attention)
    after = intervene(adapter, transcoders, ids, ivs, freeze_attention=freeze_attention)
    clean_last, after_last = clean.logits[0, -1].cpu(), after.logits[0, -1].cpu()  # (V,)
    k = min(top_k, int(clean_last.shape[0]))
    clean_top = clean_last.topk(k).indices.tolist()
    after_top = after_last.topk(k).indices.tolist()
    tok = model.tokenizer
    return (
        _predictions(tok, clean_last, clean_top),
        _predictions(tok, after_last, after_top),
        _predictions(tok, after_last, clean_top),
    )


def _evaluate(
    registry: ModelRegistry,
    name: str,
    prompt: str,
    counterfactual: str,
    tokens: tuple[int, int],
    scoring: str,
    patching: str,
    fractions: list[float],
    max_feature_nodes: int | None,
) -> Any:
    from ingest.attribution.attribute import attribute
    from ingest.attribution.faithfulness import (
        DEFAULT_FRACTIONS,
        compare_methods,
        logit_diff_metric,
    )
    from ingest.attribution.prompts import tokenize
    from ingest.attribution.targets import LogitDiffTarget, check_token

    model, transcoders = registry.get(name)
    adapter = model.adapter
    ids = tokenize(model.tokenizer, prompt, adapter.vocab_size, adapter.n_ctx)  # (1, T)
    cf_ids = tokenize(model.tokenizer, counterfactual, adapter.vocab_size, adapter.n_ctx)
    if ids.shape != cf_ids.shape:
        raise InvalidArgumentError(
            f"the prompt has {ids.shape[1]} tokens and the counterfactual {cf_ids.shape[1]}; "
            "give a counterfactual of the same token length"
        )
    correct = check_token(tokens[0], adapter.vocab_size, "correct")
    wrong = check_token(tokens[1], adapter.vocab_size, "counterfactual")
    result = attribute(
        model,
        transcoders,
        prompt,
        target=LogitDiffTarget(correct, wrong),
        max_feature_nodes=max_feature_nodes,
    )
    (curve,) = compare_methods(
        adapter,
        transcoders,
        result,
        ids.to(adapter.device),
        cf_ids.to(adapter.device),
        logit_diff_metric(correct, wrong),
        methods=[scoring],
        fractions=fractions or DEFAULT_FRACTIONS,
        patching=patching,
    )
    return curve


def _attribute(
    registry: ModelRegistry,
    name: str,
    prompt: str,
    target: object,
    max_feature_nodes: int | None,
    node_threshold: float,
    edge_threshold: float,
) -> tuple[AttributionGraph, int, float]:
    from ingest.attribution.attribute import attribute

    model, transcoders = registry.get(name)
    result = attribute(
        model,
        transcoders,
        prompt,
        target=target,  # type: ignore[arg-type]
        max_feature_nodes=max_feature_nodes,
        # the catalog id as the store knows it (hashed as loaded), so GetFeature finds
        # the graph's features
        set_id=registry.set_id(name),
    )
    graph = result.to_graph(
        pruned=True, node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    return graph, result.n_nodes, float(result.stats.get("seconds", 0.0))


def _check_model(registry: ModelRegistry, name: str) -> str:
    """Fail fast, before queueing for the model pool, on a missing or unknown model."""
    if not name:
        raise InvalidArgumentError("model is required; ListModels names the served models")
    registry.spec(name)
    return name


class AnalysisServicer(analysis_service_pb2_grpc.AnalysisServiceServicer):
    """Attribution graphs computed on request."""

    def __init__(self, registry: ModelRegistry, model_runner: BlockingRunner) -> None:
        self._registry = registry
        self._model = model_runner

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ServedModel(
                    name=n,
                    loaded=self._registry.is_loaded(n),
                    model_id=self._registry.model_id(n),
                    set_id=self._registry.set_id(n) or "",
                )
                for n in self._registry.names()
            ]
        )

    async def Attribute(
        self, request: pb.AttributeRequest, context: aio.ServicerContext
    ) -> pb.AttributeResponse:
        _check_model(self._registry, request.model)
        _check_prompt(request.prompt)
        max_nodes = _check_max_nodes(request)
        node_threshold = check_threshold(
            "node_threshold",
            request.node_threshold if request.HasField("node_threshold") else 0.8,
        )
        edge_threshold = check_threshold(
            "edge_threshold",
            request.edge_threshold if request.HasField("edge_threshold") else 0.98,
        )
        target = convert.target_from_proto(request)
        graph, full_nodes, seconds = await self._model.call(
            context,
            _attribute,
            self._registry,
            request.model,
            request.prompt,
            target,
            max_nodes,
            node_threshold,
            edge_threshold,
            pass_timeout=False,
        )
        return pb.AttributeResponse(
            graph=convert.graph_to_proto(graph), full_node_count=full_nodes, seconds=seconds
        )

    async def Intervene(
        self, request: pb.InterveneRequest, context: aio.ServicerContext
    ) -> pb.InterveneResponse:
        _check_model(self._registry, request.model)
        _check_prompt(request.prompt)
        if not 1 <= len(request.interventions) <= MAX_INTERVENTIONS:
            raise InvalidArgumentError(
                f"give 1 to {MAX_INTERVENTIONS} interventions, got {len(request.interventions)}"
            )
        changes = []
        for i, iv in enumerate(request.interventions, start=1):
            which = iv.WhichOneof("change")
            if which is None:
                raise InvalidArgumentError(f"intervention {i} needs a value or a scale")
            if iv.layer < 0 or iv.position < 0 or iv.index < 0:
                raise InvalidArgumentError(
                    f"intervention {i}: layer, position and index must be >= 0"
                )
            changes.append(
                (
                    iv.layer,
                    iv.position,
                    iv.index,
                    iv.value if which == "value" else None,
                    iv.scale if which == "scale" else None,
                )
            )
        top_k = bounded("top_k", request.top_k, 10, 1, 100)
        clean, after, clean_after = await self._model.call(
            context,
            _intervene,
            self._registry,
            request.model,
            request.prompt,
            changes,
            request.freeze_attention,
            top_k,
            pass_timeout=False,
        )
        return pb.InterveneResponse(
            clean=convert.predictions_to_proto(clean),
            intervened=convert.predictions_to_proto(after),
            clean_after=convert.predictions_to_proto(clean_after),
        )

    async def EvaluateCircuit(
        self, request: pb.EvaluateCircuitRequest, context: aio.ServicerContext
    ) -> pb.EvaluateCircuitResponse:
        _check_model(self._registry, request.model)
        _check_prompt(request.prompt)
        _check_prompt(request.counterfactual, "counterfactual")
        scoring = _SCORINGS.get(request.scoring)
        if scoring is None:
            raise InvalidArgumentError(f"unknown edge scoring {request.scoring}")
        patching = _PATCHINGS.get(request.patching)
        if patching is None:
            raise InvalidArgumentError(f"unknown circuit patching {request.patching}")
        fractions = list(request.fractions)
        if fractions and (
            not 2 <= len(fractions) <= MAX_FRACTIONS
            or any(not 0.0 < f <= 1.0 for f in fractions)
            or any(b <= a for a, b in itertools.pairwise(fractions))
        ):
            raise InvalidArgumentError(
                f"fractions must be 2 to {MAX_FRACTIONS} increasing values in (0, 1], "
                "or empty for the MIB grid"
            )
        curve = await self._model.call(
            context,
            _evaluate,
            self._registry,
            request.model,
            request.prompt,
            request.counterfactual,
            (request.correct_token_id, request.counterfactual_token_id),
            scoring,
            patching,
            fractions,
            _check_max_nodes(request),
            pass_timeout=False,
        )
        return convert.faithfulness_to_proto(curve)
