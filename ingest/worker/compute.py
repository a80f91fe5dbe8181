"""The worker's graph computer: a loaded model and transcoder set, attributing prompts.

Kept apart from :mod:`ingest.worker.worker` so that the pipeline there is written
against the small :class:`~ingest.worker.worker.GraphComputer` protocol and this is
the only module of the worker that imports torch models.
"""

from __future__ import annotations

import json
from pathlib import Path

from ingest.attribution.attribute import attribute
from ingest.attribution.prompts import single_token_id, tokenize
from ingest.attribution.result import AttributionResult
from ingest.attribution.targets import LogitDiffTarget, LogitTargets
from ingest.errors import InvalidArgumentError
from ingest.graph import FeatureRecord, ModelRecord, TranscoderSetRecord
from ingest.models import LoadedModel, load_model
from ingest.transcoders.formats import load_any
from ingest.transcoders.transcoder_set import TranscoderSet
from ingest.worker.keys import GraphSettings
from ingest.worker.prompts import PromptSpec


class AttributionComputer:
    """Attributes prompts with one model and one transcoder set."""

    def __init__(
        self,
        loaded: LoadedModel,
        transcoders: TranscoderSet,
        settings: GraphSettings,
        *,
        batch_size: int = 64,
    ) -> None:
        transcoders.check_fits(loaded.adapter)
        self.loaded = loaded
        self.transcoders = transcoders
        self.settings = settings
        self.batch_size = batch_size
        self.model_id = loaded.model_id
        self.model_fingerprint = loaded.adapter.fingerprint()
        self.set_id = transcoders.catalog_id

    @classmethod
    def from_paths(
        cls,
        model: str,
        transcoders: str | Path,
        settings: GraphSettings,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        progress: bool = True,
    ) -> AttributionComputer:
        loaded = load_model(model, device=device, progress=progress)
        tset = load_any(transcoders)
        return cls(loaded, tset, settings, batch_size=batch_size)

    def check(self, spec: PromptSpec) -> None:
        """InvalidArgumentError when ``spec`` cannot be attributed: its prompt or
        counterfactual does not tokenize for this model (empty, too long, unknown words),
        or its correct/incorrect token is not one token. Cheap: no model runs."""
        adapter = self.loaded.adapter
        tokenize(self.loaded.tokenizer, spec.prompt, adapter.vocab_size, adapter.n_ctx)
        self._check_counterfactual(spec)
        self._target(spec)

    def _check_counterfactual(self, spec: PromptSpec) -> None:
        if spec.counterfactual is None:
            return
        adapter = self.loaded.adapter
        try:
            tokenize(self.loaded.tokenizer, spec.counterfactual, adapter.vocab_size, adapter.n_ctx)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"counterfactual: {exc}") from None

    def _target(self, spec: PromptSpec) -> LogitTargets | LogitDiffTarget:
        """The logit difference of ``correct`` and ``incorrect`` (checked against the
        vocabulary) when both are given, else the top logits of the settings."""
        if spec.correct is None or spec.incorrect is None:
            return LogitTargets(
                max_n_logits=self.settings.max_n_logits,
                desired_logit_prob=self.settings.desired_logit_prob,
            )
        tokenizer = self.loaded.tokenizer
        target = LogitDiffTarget(
            correct=single_token_id(tokenizer, spec.correct, "correct token"),
            counterfactual=single_token_id(tokenizer, spec.incorrect, "incorrect token"),
        )
        target.checked(self.loaded.adapter.vocab_size)
        return target

    def compute(self, spec: PromptSpec, graph_id: str) -> AttributionResult:
        # attribute() checks the prompt itself; the counterfactual is only stored
        self._check_counterfactual(spec)
        target = self._target(spec)
        return attribute(
            self.loaded,
            self.transcoders,
            spec.prompt,
            target=target,
            max_feature_nodes=self.settings.max_feature_nodes,
            batch_size=self.batch_size,
            graph_id=graph_id,
            model_id=self.model_id,
            set_id=self.set_id,
        )

    def model_record(self) -> ModelRecord:
        adapter = self.loaded.adapter
        return ModelRecord(
            model_id=self.model_id,
            architecture=adapter.family,
            n_layers=adapter.n_layers,
            d_model=adapter.d_model,
            source=self.model_id,
        )

    def set_record(self) -> TranscoderSetRecord:
        meta = self.transcoders.metadata
        return TranscoderSetRecord(
            set_id=self.set_id,
            model_id=self.model_id,
            kind=meta.kind,
            d_transcoder=self.transcoders.d_transcoder,  # labels check indices against it
        )


FEATURE_STATS_FILE = "feature_stats.json"


def feature_records(transcoders_dir: str | Path, set_id: str) -> list[FeatureRecord]:
    """The catalog entries of a set from its ``feature_stats.json`` ([] when absent)."""
    path = Path(transcoders_dir) / FEATURE_STATS_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"{path} is not valid JSON ({exc}): rerun 'circuitscope transcoders stats'"
        ) from exc
    return [FeatureRecord.from_stats(row, set_id) for row in rows]
