"""Tasks: built-in names and local/hub datasets, each a Task (see base.py)."""
from .base import Row, Task

__all__ = ["Row", "Task", "load_task", "TASK_NAMES"]

TASK_NAMES = ("arithmetic",)


def load_task(name_or_path: str, **options) -> Task:
    """A built-in task by name; unknown names are a UserError."""
    from ..errors import UserError

    if name_or_path == "arithmetic":
        from .arithmetic import arithmetic_task
        return arithmetic_task(**options)
    raise UserError(f"unknown task {name_or_path!r}: choose one of {', '.join(TASK_NAMES)} "
                    "or give a dataset file")
