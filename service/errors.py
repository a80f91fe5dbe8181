"""The one place domain errors become gRPC status codes.

:class:`ErrorMappingInterceptor` wraps every RPC handler of the server (servicers,
health, reflection) and guarantees the wire never shows an internal failure's details:

=============================  ======================
domain error (ingest.errors)   gRPC status
=============================  ======================
InvalidArgumentError           INVALID_ARGUMENT
NotFoundError                  NOT_FOUND
FailedPreconditionError        FAILED_PRECONDITION
AlreadyExistsError             ALREADY_EXISTS
ResourceExhaustedError         RESOURCE_EXHAUSTED
UnavailableError               UNAVAILABLE
DataLossError                  DATA_LOSS
UnauthenticatedError           UNAUTHENTICATED
PermissionDeniedError          PERMISSION_DENIED
a stub's NotImplementedError   UNIMPLEMENTED
any other exception            INTERNAL (generic message; details logged)
=============================  ======================

A domain error's message (which says what to do) goes on the wire as the status
details. A request whose bytes do not parse as the method's message is answered
INVALID_ARGUMENT (grpc would otherwise answer INTERNAL). Servicers raise domain errors
and never call ``context.abort`` themselves.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from ingest.errors import (
    AlreadyExistsError,
    CircuitscopeError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[CircuitscopeError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DataLossError: grpc.StatusCode.DATA_LOSS,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}
INTERNAL_MESSAGE = "internal error; the server logged the details"
#: What a generated servicer base class raises for a method it leaves unimplemented.
STUB_UNIMPLEMENTED = "Method not implemented!"
#: Trailing metadata of an UNAVAILABLE answer the server gave after retrying itself (its
#: value: for how many seconds); the client does not retry such an answer.
RETRIED_KEY = "circuitscope-retried-s"
_MAX_DETAILS = 1000


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and wire message for an exception raised by a handler."""
    if isinstance(exc, CircuitscopeError):
        for cls in type(exc).__mro__:
            code = STATUS_BY_ERROR.get(cls)  # type: ignore[call-overload]
            if code is not None:
                # one line: a driver's message may carry newlines
                return code, _bounded(" ".join(str(exc).split())) or cls.__name__
    if isinstance(exc, NotImplementedError) and str(exc) == STUB_UNIMPLEMENTED:
        # a generated servicer base class's method nobody implemented (a library's
        # NotImplementedError, e.g. an operator a device lacks, stays INTERNAL)
        return grpc.StatusCode.UNIMPLEMENTED, "this server does not implement the method"
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _bounded(message: str) -> str:
    """At most ``_MAX_DETAILS`` characters: a message echoing a huge request value keeps
    its start and its end, which says what to do."""
    if len(message) <= _MAX_DETAILS:
        return message
    tail = _MAX_DETAILS // 3
    return f"{message[: _MAX_DETAILS - tail - 5]} ... {message[-tail:]}"


class _Malformed:
    """Stands in for a request whose bytes did not parse."""


_MALFORMED = _Malformed()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _MALFORMED

    return parse


async def _abort(context: aio.ServicerContext, method: str, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("unexpected error in %s", method, exc_info=exc)
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=retried_metadata(exc))


def retried_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailer that tells a client the server already retried (:data:`RETRIED_KEY`,
    in seconds), for an UnavailableError raised after its own retries."""
    if isinstance(exc, UnavailableError) and exc.retried_for_s is not None:
        return ((RETRIED_KEY, f"{exc.retried_for_s:g}"),)
    return ()


async def _check(request: Any, context: aio.ServicerContext) -> None:
    if request is _MALFORMED:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request bytes are not a valid message of this method's request type",
        )


def _wrap_unary_response(behavior: Callable[..., Any], method: str, streaming_request: bool):
    async def handle(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
        if streaming_request:
            request_or_iterator = _checked_iterator(request_or_iterator, context)
        else:
            await _check(request_or_iterator, context)
        try:
            result = behavior(request_or_iterator, context)
            return await result if inspect.isawaitable(result) else result
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return handle


def _wrap_stream_response(behavior: Callable[..., Any], method: str, streaming_request: bool):
    async def handle(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        if streaming_request:
            request_or_iterator = _checked_iterator(request_or_iterator, context)
        else:
            await _check(request_or_iterator, context)
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            elif inspect.isawaitable(result):
                # A coroutine handler that writes with context.write (e.g. health Watch).
                await result
            else:
                for response in result:
                    yield response
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return handle


async def _checked_iterator(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        await _check(request, context)
        yield request


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps domain errors to status codes and hides unexpected failures (see module doc).

    The wrapped handler of each method is built once and reused while the inner
    handler stays the same (the registered one); a different inner handler (e.g. one
    rejecting a call without a valid token) is wrapped afresh.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, method)
        # Keys are registered methods only (unknown ones have no handler): bounded.
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserializer = _lenient(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, method, False),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, method, False),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, method, True),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream_response(handler.stream_stream, method, True),
        request_deserializer=deserializer,
        response_serializer=serializer,
    )
