"""The zoo's tasks, registered by name in :data:`TASKS` (also the CLI's choices).

Each task lives in its own module; :func:`get_task` returns the registered instance with
its default parameters, raising :class:`~ingest.errors.InvalidArgumentError` for an
unknown name.
"""

from ingest.zoo.registry import Registry
from ingest.zoo.task import Task
from ingest.zoo.tasks.greater_than import GreaterThan
from ingest.zoo.tasks.induction import Induction
from ingest.zoo.tasks.ioi import IOI
from ingest.zoo.tasks.modular_addition import ModularAddition

TASKS: Registry[Task] = Registry("task")
for _task in (GreaterThan(), ModularAddition(), IOI(), Induction()):
    TASKS.register(_task.name, _task)


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    return TASKS.get(name)


__all__ = ["IOI", "TASKS", "GreaterThan", "Induction", "ModularAddition", "get_task"]
