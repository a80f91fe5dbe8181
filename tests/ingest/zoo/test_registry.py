import pytest

from ingest.errors import InvalidArgumentError
from ingest.zoo.architectures import ARCHITECTURES
from ingest.zoo.registry import Registry
from ingest.zoo.tasks import TASKS


@pytest.mark.unit
def test_registry_rejects_duplicates_and_names_choices() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    registry.decorator("b")(2)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", 3)
    assert registry.get("b") == 2
    assert registry.names() == ["a", "b"]
    with pytest.raises(InvalidArgumentError, match=r"unknown widget 'c': choose one of a, b"):
        registry.get("c")


@pytest.mark.unit
def test_zoo_registries_hold_the_tasks_and_architectures() -> None:
    assert TASKS.names() == ["greater_than", "modular_addition", "ioi", "induction"]
    assert ARCHITECTURES.names() == ["gpt2", "neox", "llama"]
    for name in TASKS:
        assert TASKS.get(name).name == name
