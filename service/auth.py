"""Bearer-token authentication for the gRPC server.

Callers send ``authorization: Bearer <token>`` metadata (RFC 6750 over gRPC metadata).
:class:`BearerTokenInterceptor` admits a call when its token is one of the configured
tokens (compared in constant time) and otherwise answers UNAUTHENTICATED by raising
:class:`ingest.errors.UnauthenticatedError` inside the handler, so the one error
mapping in :mod:`service.errors` sets the status. The health and reflection services
are exempt: load balancers and generic tools call them without credentials.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from ingest.errors import UnauthenticatedError

AUTH_HEADER = "authorization"
EXEMPT_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def _token_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls to non-exempt methods that carry no valid bearer token."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def _valid(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare against every token so timing does not reveal which one matched.
        matches = [hmac.compare_digest(given, t) for t in self._tokens]
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        token = _token_of(handler_call_details.invocation_metadata)
        if self._valid(token):
            return handler
        return _rejecting(handler, "missing bearer token" if token is None else "invalid token")


def _rejecting(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UnauthenticatedError."""
    message = (
        f"{reason}; send metadata 'authorization: Bearer <token>' with a token the server "
        "was configured with"
    )

    async def reject(request: Any, context: aio.ServicerContext) -> Any:
        raise UnauthenticatedError(message)

    async def reject_stream(request: Any, context: aio.ServicerContext) -> Any:
        raise UnauthenticatedError(message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **kwargs)
