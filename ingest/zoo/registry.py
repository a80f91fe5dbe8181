"""A name-keyed registry for variants (tasks, architectures).

Registries are the single source of the names a user may pass: the CLI lists
``registry.names()`` as its choices and looks values up with :meth:`Registry.get`, which
raises :class:`~ingest.errors.InvalidArgumentError` naming the valid choices. Registering
a name twice is a programming error and raises ``ValueError`` at import time.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ingest.errors import InvalidArgumentError

T = TypeVar("T")


class Registry(Generic[T]):
    """An insertion-ordered mapping from names to values of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name``; a duplicate name raises ``ValueError``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = value
        return value

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object."""

        def wrap(value: T) -> T:
            return self.register(name, value)

        return wrap

    def get(self, name: str) -> T:
        """The value registered under ``name``, or an error listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
