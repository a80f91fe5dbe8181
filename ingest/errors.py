"""Domain errors.

Every failure a user can cause or fix is one of these. Each class maps to exactly one
gRPC status code (in ``service``) and to a one-line message with a non-zero exit code
in the CLI. Messages name the problem and say what to do instead.
"""


class CircuitscopeError(Exception):
    """Base class of all domain errors."""


class InvalidArgumentError(CircuitscopeError):
    """The request itself is wrong: a bad value, shape, name or file layout."""


class NotFoundError(CircuitscopeError):
    """A named thing (file, checkpoint, graph, feature, job) does not exist."""


class FailedPreconditionError(CircuitscopeError):
    """The request is well-formed but the system is not in a state to serve it."""


class AlreadyExistsError(FailedPreconditionError):
    """The thing to create exists already (e.g. a complete graph with that id)."""


class ResourceExhaustedError(CircuitscopeError):
    """A size or rate limit was exceeded."""


class UnavailableError(CircuitscopeError):
    """A dependency (the graph store, a device, the hub) cannot be reached right now.

    ``retried_for_s``: how long the raiser already retried (the store driver's retry
    time), so that its callers need not retry again at once; None when it did not.
    """

    def __init__(self, message: str = "", *, retried_for_s: float | None = None) -> None:
        super().__init__(message)
        self.retried_for_s = retried_for_s


class DataLossError(CircuitscopeError):
    """Data the system wrote earlier (a graph's artifact) is damaged or cannot be read."""


class PermissionDeniedError(CircuitscopeError):
    """The caller is authenticated but not allowed to do this."""


class UnauthenticatedError(CircuitscopeError):
    """The caller did not present valid credentials."""
