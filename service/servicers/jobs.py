"""``circuits.v1.JobService`` over :class:`service.jobs.JobManager`.

Submission validates and queues (no model work on the event loop): the model and the
number of prompts are checked before any prompt is looked at, then every field's length.
WatchJob polls the job's version and sends a snapshot whenever it changed, until the job
finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

from grpc import aio

from ingest.errors import InvalidArgumentError
from service import convert
from service._generated.circuits.v1 import job_service_pb2 as pb
from service._generated.circuits.v1 import job_service_pb2_grpc
from service.artifacts import check_threshold
from service.jobs import JobManager, JobState, settings_for
from service.pagination import decode_page_token, encode_page_token, page_size
from service.servicers.analysis import MAX_FEATURE_NODES, MAX_PROMPT_CHARS

WATCH_POLL_S = 0.2
#: the longest task label, prompt id and answer tokens (``correct``, ``incorrect``)
MAX_LABEL_CHARS = 256
_FIELD_LIMITS = (
    ("prompt", MAX_PROMPT_CHARS),
    ("counterfactual", MAX_PROMPT_CHARS),
    ("task", MAX_LABEL_CHARS),
    ("prompt_id", MAX_LABEL_CHARS),
    ("correct", MAX_LABEL_CHARS),
    ("incorrect", MAX_LABEL_CHARS),
)


def _job_id(value: str) -> str:
    if not value:
        raise InvalidArgumentError("job_id is required")
    return value


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    """Ingest jobs: submit, inspect, follow, cancel."""

    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    async def SubmitIngest(
        self, request: pb.SubmitIngestRequest, context: aio.ServicerContext
    ) -> pb.SubmitIngestResponse:
        if not request.model:
            raise InvalidArgumentError("model is required; ListModels names the served models")
        # the model and the count first: a huge request is refused before its prompts
        # are looked at (this runs on the event loop)
        self._jobs.check_request(request.model, len(request.prompts))
        for i, prompt in enumerate(request.prompts, start=1):
            for name, limit in _FIELD_LIMITS:
                size = len(getattr(prompt, name))
                if size > limit:
                    raise InvalidArgumentError(
                        f"prompt {i}: {name} has {size} characters; keep it to at most {limit}"
                    )
        max_nodes = request.max_feature_nodes if request.HasField("max_feature_nodes") else None
        if max_nodes is not None and not 1 <= max_nodes <= MAX_FEATURE_NODES:
            raise InvalidArgumentError(
                f"max_feature_nodes must be in 1..{MAX_FEATURE_NODES}, got {max_nodes}"
            )
        settings = settings_for(
            check_threshold("node_threshold", request.node_threshold)
            if request.HasField("node_threshold")
            else None,
            check_threshold("edge_threshold", request.edge_threshold)
            if request.HasField("edge_threshold")
            else None,
            max_nodes,
        )
        records = [convert.ingest_prompt_from_proto(p) for p in request.prompts]
        job = self._jobs.submit(request.model, records, settings)
        return pb.SubmitIngestResponse(job=convert.job_to_proto(job))

    async def GetJob(
        self, request: pb.GetJobRequest, context: aio.ServicerContext
    ) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=convert.job_to_proto(self._jobs.get(_job_id(request.job_id))))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        job_id = _job_id(request.job_id)
        last_version = -1
        while True:
            # a poll reads one number; a snapshot is taken only when the job changed
            if self._jobs.version(job_id) != last_version:
                job = self._jobs.get(job_id)
                last_version = job.version
                yield pb.WatchJobResponse(job=convert.job_to_proto(job))
                if job.state.finished:
                    return
            await asyncio.sleep(WATCH_POLL_S)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: aio.ServicerContext
    ) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(
            job=convert.job_to_proto(self._jobs.cancel(_job_id(request.job_id)))
        )

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: aio.ServicerContext
    ) -> pb.ListJobsResponse:
        state = None
        if request.state != pb.JOB_STATE_UNSPECIFIED:
            if request.state not in convert.JOB_STATE_NAMES:
                raise InvalidArgumentError(f"state {request.state} is not a JobState value")
            state = JobState(convert.JOB_STATE_NAMES[request.state])
        filters = {"state": request.state, "model": request.model}
        after = _job_keyset(decode_page_token(request.page_token, filters))
        jobs, last = self._jobs.list_jobs(
            state=state,
            model=request.model or None,
            limit=page_size(request.page_size),
            after=after,
        )
        cursor = None if last is None else [last[0].isoformat(), last[1]]
        return pb.ListJobsResponse(
            jobs=[convert.job_to_proto(job) for job in jobs],
            next_page_token=encode_page_token(cursor, filters),
        )


def _job_keyset(cursor: object) -> tuple[datetime, str] | None:
    """The (created_at, job_id) a page token carries (None: the first page)."""
    if cursor is None:
        return None
    bad = InvalidArgumentError(
        "page_token is malformed; pass the next_page_token of the previous response unchanged"
    )
    if not (
        isinstance(cursor, list) and len(cursor) == 2 and all(isinstance(c, str) for c in cursor)
    ):
        raise bad
    try:
        created = datetime.fromisoformat(cursor[0])
    except ValueError:
        raise bad from None
    if created.tzinfo is None:  # the server writes UTC times; a naive one was not ours
        raise bad
    return created, cursor[1]
