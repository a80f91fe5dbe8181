"""``circuits.v1.JobService`` over :class:`service.jobs.JobManager`.

Submission validates and queues (no model work on the event loop); WatchJob polls the
job's snapshot and sends it whenever its version changed, until the job finishes.
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
        for i, prompt in enumerate(request.prompts, start=1):
            if len(prompt.prompt) > MAX_PROMPT_CHARS:
                raise InvalidArgumentError(
                    f"prompt {i} has {len(prompt.prompt)} characters; keep under {MAX_PROMPT_CHARS}"
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
            job = self._jobs.get(job_id)
            if job.version != last_version:
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
