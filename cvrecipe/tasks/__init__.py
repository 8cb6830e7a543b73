"""Tasks: what a model's outputs mean, and everything that follows from it.

A task owns its loss, its augmentation of (image, target) pairs, its metrics accumulated over a
whole split, what `eval.json` holds and prints, its items' scores for the sanity checks and its
parity measure for exports. The training loop, evaluation, export and serving talk to a task
object; the report sections and the serving routes of a task live in the evaluate and serve
packages (a file per task, looked up by the task's name). A new task is a new file here plus
those, a data source, models and a recipe: the loop's body does not change.
"""
from __future__ import annotations

from cvrecipe.tasks.base import Meter, ParityReport, Task

__all__ = ["Meter", "ParityReport", "Task", "get_task", "task_names"]


def _registry() -> dict[str, type[Task]]:
    from cvrecipe.tasks.classification import Classification
    from cvrecipe.tasks.segmentation import Segmentation

    return {"classification": Classification, "segmentation": Segmentation}


def task_names() -> list[str]:
    return sorted(_registry())


def get_task(name: str, cfg=None) -> Task:
    """The task object; `cfg` (a Config) configures it where the task has a section of its own
    (segmentation: cfg.segment, its loss)."""
    tasks = _registry()
    if name not in tasks:
        raise ValueError(f"unknown task '{name}'; known: {', '.join(sorted(tasks))}")
    cls = tasks[name]
    return cls(getattr(cfg, cls.section) if cfg is not None and cls.section else None)
