"""The ingest worker: a prompt file in, graphs out.

For every prompt of a JSONL file (:mod:`ingest.worker.prompts`) the worker computes
the full attribution graph, writes it to disk as a compact artifact
(:mod:`ingest.attribution.artifact`), prunes it (DESIGN 5.3) and writes the pruned
graph to the graph store, its ``artifact_uri`` pointing at the artifact.

Guarantees:

- Idempotent: a graph's id hashes model, transcoder set, prompt and settings
  (:mod:`ingest.worker.keys`); a graph already complete in the store is skipped.
- Resumable after a kill at any point: artifacts are written atomically (a complete
  directory or none), a graph becomes visible in the store only when all of it is
  written, and the store repairs a half-written graph on the next write. An artifact
  left by a killed run is reused rather than recomputed.
- Shared work: several workers on the same file claim graphs before computing them
  (:mod:`ingest.worker.claims`), so they split the file instead of duplicating it.
- Memory bounded: the file is streamed and one graph is held at a time.
- Bad lines are reported with their line numbers and skipped; with ``strict`` the
  whole file is validated first and the run aborts before doing any work.
- Store outages are retried with backoff (:mod:`ingest.worker.retry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm import tqdm

from ingest.errors import (
    AlreadyExistsError,
    CircuitscopeError,
    InvalidArgumentError,
    NotFoundError,
)
from ingest.graph import FeatureRecord, ModelRecord, TranscoderSetRecord
from ingest.store.base import GraphStore
from ingest.worker.claims import ClaimBook
from ingest.worker.keys import GraphSettings, graph_key
from ingest.worker.prompts import BadLine, PromptSpec, read_prompts
from ingest.worker.retry import with_retry

if TYPE_CHECKING:
    from ingest.attribution.result import AttributionResult

log = logging.getLogger(__name__)


class GraphComputer(Protocol):
    """Computes the full attribution graph of one prompt (see :mod:`ingest.worker.compute`)."""

    model_id: str
    model_fingerprint: str
    set_id: str

    def check(self, spec: PromptSpec) -> None:
        """InvalidArgumentError when ``spec`` cannot be attributed (cheap: no model runs)."""

    def compute(self, spec: PromptSpec, graph_id: str) -> AttributionResult: ...

    def model_record(self) -> ModelRecord: ...

    def set_record(self) -> TranscoderSetRecord: ...


@dataclass(frozen=True)
class IngestOptions:
    """How one ingest run behaves."""

    artifacts_dir: Path
    settings: GraphSettings = field(default_factory=GraphSettings)
    strict: bool = False
    store_batch_size: int | None = None
    max_retry_s: float = 300.0
    claim_lease_s: float = 600.0
    progress: bool = True


@dataclass
class IngestSummary:
    """What one run did."""

    computed: list[str] = field(default_factory=list)
    already_done: int = 0
    claimed_elsewhere: int = 0
    reused_artifacts: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    seconds: float = 0.0
    attribution_seconds: float = 0.0
    store_seconds: float = 0.0

    @property
    def n_seen(self) -> int:
        return len(self.computed) + self.already_done + self.claimed_elsewhere + len(self.bad_lines)

    def lines(self) -> list[str]:
        rate = len(self.computed) / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"graphs written:        {len(self.computed)}",
            f"already in the store:  {self.already_done}",
            f"claimed by a worker:   {self.claimed_elsewhere}",
            f"artifacts reused:      {self.reused_artifacts}",
            f"bad lines skipped:     {len(self.bad_lines)}",
            f"seconds:               {self.seconds:.1f} ({rate:.2f} graphs/s; "
            f"attribution {self.attribution_seconds:.1f}, store writes {self.store_seconds:.1f})",
        ]
        out += [f"  {bad}" for bad in self.bad_lines]
        return out


def _count_lines(path: Path) -> int:
    """The lines that hold a prompt (or a bad line): not blank, not a ``#`` comment."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip() and not line.lstrip().startswith(b"#"))


def _validate_all(path: Path, computer: GraphComputer | None = None, first_line: int = 1) -> None:
    """Every line of ``path``: JSON and fields, then (given ``computer``) each prompt
    against the model: its tokens, its answer tokens. InvalidArgumentError listing the
    bad lines."""
    bad: list[BadLine] = []
    for item in read_prompts(path, first_line):
        if isinstance(item, BadLine):
            bad.append(item)
            continue
        try:
            if computer is not None:
                computer.check(item)
        except InvalidArgumentError as exc:
            bad.append(BadLine(item.line, str(exc)))
    if bad:
        listed = "; ".join(str(b) for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InvalidArgumentError(
            f"{path}: {len(bad)} bad line(s): {listed}{more}; fix them or run without --strict"
        )


class IngestWorker:
    """Runs the ingest pipeline over prompt files against one store and one model.

    ``on_message`` hears each wait for an unreachable store; ``interrupted`` ends such a
    wait early (the store's error is raised then), for callers that can be cancelled.
    """

    def __init__(
        self,
        store: GraphStore,
        computer: GraphComputer,
        options: IngestOptions,
        *,
        on_message: Callable[[str], None] | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.computer = computer
        self.options = options
        self.on_message = on_message
        self.interrupted = interrupted
        self.claims = ClaimBook(options.artifacts_dir / "claims", lease_s=options.claim_lease_s)

    def _retry(self, call: Callable[[], object], what: str) -> object:
        return with_retry(
            call,
            what=what,
            max_wait_s=self.options.max_retry_s,
            on_retry=self.on_message,
            interrupted=self.interrupted,
        )

    def register(self, catalog: Sequence[FeatureRecord] = ()) -> None:
        """Write the model, the transcoder set and its feature catalog to the store."""
        self._retry(
            lambda: self.store.upsert_model(self.computer.model_record()), "registering the model"
        )
        self._retry(
            lambda: self.store.upsert_transcoder_set(self.computer.set_record()),
            "registering the transcoder set",
        )
        if catalog:
            self._retry(lambda: self.store.upsert_features(catalog), "writing the feature catalog")

    def _is_done(self, graph_id: str) -> bool:
        def check() -> bool:
            try:
                self.store.get_graph_summary(graph_id)
            except NotFoundError:
                return False
            return True

        return bool(self._retry(check, f"checking graph {graph_id}"))

    def _artifact_dir(self, graph_id: str) -> Path:
        return self.options.artifacts_dir / "graphs" / graph_id

    def _full_result(self, spec: PromptSpec, graph_id: str) -> tuple[AttributionResult, bool]:
        """The full graph: reused from an artifact a killed run left, or computed."""
        from ingest.attribution.artifact import load_artifact, save_artifact

        directory = self._artifact_dir(graph_id)
        if directory.is_dir():
            try:
                return load_artifact(directory), True
            except CircuitscopeError as exc:
                log.warning("recomputing %s: its artifact is unusable (%s)", graph_id, exc)
        result = self.computer.compute(spec, graph_id)
        save_artifact(result, directory, overwrite=True)
        return result, False

    def _ingest_one(self, spec: PromptSpec, summary: IngestSummary) -> None:
        settings = self.options.settings
        graph_id = graph_key(self.computer.model_fingerprint, self.computer.set_id, spec, settings)
        if self._is_done(graph_id):
            summary.already_done += 1
            return
        claim = self.claims.try_claim(graph_id)
        if claim is None:
            summary.claimed_elsewhere += 1
            return
        try:
            # Another worker may have stored the graph and released its claim between the
            # check above and this claim: a finished graph's claim is gone, so look again.
            if self._is_done(graph_id):
                summary.already_done += 1
                return
            started = time.perf_counter()
            result, reused = self._full_result(spec, graph_id)
            summary.reused_artifacts += int(reused)
            graph = result.to_graph(
                pruned=True,
                node_threshold=settings.node_threshold,
                edge_threshold=settings.edge_threshold,
            )
            graph.metadata = dataclasses.replace(
                graph.metadata,
                graph_id=graph_id,
                task=spec.task,
                artifact_uri=self._artifact_dir(graph_id).resolve().as_uri(),
                extra={
                    **graph.metadata.extra,
                    "prompt_id": spec.prompt_id,
                    "counterfactual": spec.counterfactual,
                    "line": spec.line,
                },
            )
            claim.refresh()
            summary.attribution_seconds += time.perf_counter() - started
            started = time.perf_counter()

            def write() -> None:
                # AlreadyExists: another worker finished the same graph after our claim
                # went stale; the stored graph is the same one. Any other failure (a
                # write taken over by another writer, a constraint violation) leaves the
                # graph unstored and must not be counted as written.
                with contextlib.suppress(AlreadyExistsError):
                    self.store.write_graph(graph, batch_size=self.options.store_batch_size)

            self._retry(write, f"writing graph {graph_id}")
            summary.store_seconds += time.perf_counter() - started
            summary.computed.append(graph_id)
        finally:
            claim.release()

    def run(
        self,
        prompts: Path,
        summary: IngestSummary | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        first_line: int = 1,
    ) -> IngestSummary:
        """Ingest every prompt of ``prompts``; returns what was done. Given ``summary``,
        fills it in as the run goes. ``stop`` is asked before each prompt: when it turns
        true the run ends there (a Ctrl-C that lets the current graph finish).
        ``first_line`` numbers the file's first line, for graphs' ``extra.line`` and
        skipped lines (a job's prompt i, written alone, is line i)."""
        if self.options.strict:
            _validate_all(prompts, self.computer, first_line)
        summary = IngestSummary() if summary is None else summary
        started = time.perf_counter()
        total = _count_lines(prompts) if prompts.is_file() else None
        try:
            self._run(prompts, summary, total, stop, first_line)
        finally:
            summary.seconds = time.perf_counter() - started
        return summary

    def _run(
        self,
        prompts: Path,
        summary: IngestSummary,
        total: int | None,
        stop: Callable[[], bool] | None,
        first_line: int,
    ) -> None:
        with tqdm(
            total=total, desc="ingest", unit="prompt", disable=not self.options.progress
        ) as bar:
            for item in read_prompts(prompts, first_line):
                if stop is not None and stop():
                    return
                if isinstance(item, BadLine):
                    summary.bad_lines.append(item)
                    log.warning("skipping %s", item)
                else:
                    try:
                        self._ingest_one(item, summary)
                    except InvalidArgumentError as exc:
                        # The prompt itself cannot be attributed (unknown word, too long, ...).
                        bad = BadLine(item.line, str(exc))
                        if self.options.strict:
                            raise InvalidArgumentError(f"{prompts}: {bad}") from exc
                        summary.bad_lines.append(bad)
                        log.warning("skipping %s", bad)
                bar.update(1)
                bar.set_postfix(written=len(summary.computed), bad=len(summary.bad_lines))
