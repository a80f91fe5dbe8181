"""The client side of a circuits.v1 connection: channel, credentials, retries, errors.

:class:`Transport` owns one gRPC channel (plaintext, TLS or mutual TLS, with the same
message-size limits as the server), sends the bearer token with every call, retries
calls answered UNAVAILABLE with bounded exponential backoff and full jitter
(:class:`RetryPolicy`; a stream only before its first message; not an answer whose
trailer says the server retried already, :data:`service.errors.RETRIED_KEY`), and turns
a failed call back into the domain error the server mapped from (:func:`error_from_rpc`).
:class:`service.client.CircuitsClient` builds the typed API on it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ingest.errors import CircuitscopeError, InvalidArgumentError, UnavailableError
from service.auth import bearer_metadata
from service.config import DEFAULT_MAX_MESSAGE_BYTES
from service.errors import RETRIED_KEY, STATUS_BY_ERROR

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ERROR_BY_STATUS = {code: cls for cls, code in STATUS_BY_ERROR.items()}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for UNAVAILABLE: ``max_attempts`` tries in all."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based): full jitter on the cap."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0, cap)


@dataclass(frozen=True)
class ClientTls:
    """TLS for the client: the CA to trust (None: system roots) and an optional client
    certificate for mutual TLS."""

    root_ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        # gRPC's C core aborts the whole process on a certificate without its key.
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidArgumentError(
                "a client certificate and its private key go together (mutual TLS): "
                "give both client_cert and client_key, or neither"
            )

    @classmethod
    def from_files(
        cls,
        root_ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        return cls(read(root_ca), read(client_cert), read(client_key), server_name)


def error_from_rpc(exc: grpc.RpcError) -> CircuitscopeError:
    """The domain error a failed call stands for."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or (
        f"the server answered {code.name} without details"
    )
    cls = _ERROR_BY_STATUS.get(code)
    if cls is not None:
        return cls(details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(
            f"the call ran past its deadline ({details}): the server, or the graph store "
            "behind it, is slow or not answering; check it, or allow more time (--timeout)"
        )
    return UnavailableError(f"call failed with {code.name}: {details}")


def _retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE, unless the server says it retried already (:data:`RETRIED_KEY`):
    the graph store behind it was down for the whole of its own retries."""
    if not isinstance(exc, grpc.Call) or exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == RETRIED_KEY for key, _ in exc.trailing_metadata() or ())


class Transport:
    """One channel to a circuits.v1 server, with retries and domain errors (see module doc)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            creds = grpc.ssl_channel_credentials(tls.root_ca, tls.client_key, tls.client_cert)
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._target = target
        self._tls = tls
        self._metadata = bearer_metadata(token) if token else ()
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def error(self, exc: grpc.RpcError) -> CircuitscopeError:
        """The domain error of a failed call, with advice when the server is unreachable."""
        error = error_from_rpc(exc)
        if isinstance(error, UnavailableError) and "failed to connect" in str(error):
            return UnavailableError(
                f"cannot reach a circuitscope server at {self._target} ({error}); check that "
                "`circuitscope serve` runs there and the target, TLS and port are right"
                + self._handshake_hint(str(error))
            )
        return error

    def _handshake_hint(self, message: str) -> str:
        """What a TLS server closing the connection at once may mean: it requires a
        client certificate (``serve --client-ca``), or refused the one given."""
        if self._tls is None or "Socket closed" not in message:
            return ""
        if self._tls.client_cert is None:
            return (
                "; a server that requires client certificates (serve --client-ca) closes "
                "the connection without one: pass --tls-cert and --tls-key"
            )
        return (
            "; a server that requires client certificates (serve --client-ca) closes the "
            "connection on one its CA did not sign: check --tls-cert and --tls-key"
        )

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def call(self, method: Callable[..., T], request: Any, timeout_s: float | None = None) -> T:
        """``method(request)`` with the token and deadline, retried on UNAVAILABLE."""
        attempt = 1
        while True:
            try:
                timeout = self._timeout_s if timeout_s is None else timeout_s
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if _retryable(exc) and attempt < self._retry.max_attempts:
                    delay = self._retry.backoff(attempt)
                    logger.info("UNAVAILABLE, retry %d in %.2f s", attempt, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise self.error(exc) from None

    def stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        """The responses of server-streaming ``method``, retried only before the first."""
        attempt = 1
        while True:
            received = False
            try:
                for response in method(request, timeout=self._timeout_s, metadata=self._metadata):
                    received = True
                    yield response
                return
            except grpc.RpcError as exc:
                if _retryable(exc) and not received and attempt < self._retry.max_attempts:
                    time.sleep(self._retry.backoff(attempt))
                    attempt += 1
                    continue
                raise self.error(exc) from None
