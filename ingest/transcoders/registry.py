"""A name-keyed registry of variants (SAELens style) that rejects duplicates.

Registries are the single source of the choices a CLI flag offers, so adding an
architecture in one place makes it trainable, loadable and selectable.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ingest.errors import InvalidArgumentError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to one registered object of kind ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("topk")`` registers the decorated object."""

        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if not name or not name.replace("_", "").isalnum():
            raise InvalidArgumentError(
                f"{self.kind} name {name!r} must be non-empty letters, digits and '_'"
            )
        if name in self._items:
            raise InvalidArgumentError(
                f"{self.kind} {name!r} is already registered: choose another name"
            )
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
