"""Tasks: what a model's outputs mean, and everything that follows from it.

The registry (registry.py) is the one place task names are written. A task is its files plus one entry here:
- `task`: its Task class (torch: loss, augmentation, metrics, outputs, parity; tasks/base.py);
- `spec`: its torch-free facts (metric names, the config rules only it understands, how images
  reach its model), read by the config checks and the server without importing torch;
- `answers`: its torch-free answer layer (top-k, mask, ...), shared by `predict`, the server and
  the monitor;
- `report`: the evaluate-layer module with its report sections (`sections(ctx)`);
- `routes`: the serve-layer module with its serving routes (`add_routes(app, require_token, task)`).
Modules are named, not imported, here: each layer imports the ones it uses (tasks.resolve), so
this file imports neither torch nor anything above it.
"""
from __future__ import annotations

from cvrecipe.tasks.registry import (DEFAULT_TASK, TASKS, TaskEntry, answers_of, entry, resolve, spec_of, task_names,
                                     task_of)

__all__ = ["DEFAULT_TASK", "TASKS", "Meter", "ParityReport", "Task", "TaskEntry", "answers_of", "entry",
           "get_task", "resolve", "spec_of", "task_names", "task_of"]


def _registry() -> dict[str, type]:
    """Task name → its Task class (imported, with torch, on first use)."""
    return {name: resolve(task.task) for name, task in TASKS.items()}


def get_task(name: str | None, cfg=None):
    """The task object of task `name` (None: the default task); `cfg` (a Config) configures it where
    the task has a section of its own (segmentation: cfg.segment, its loss)."""
    tasks = _registry()
    name = DEFAULT_TASK if name is None else name
    if name not in tasks:
        raise ValueError(f"unknown task '{name}'; known: {', '.join(sorted(tasks))}")
    cls = tasks[name]
    return cls(getattr(cfg, cls.section) if cfg is not None and cls.section else None)


def __getattr__(name: str):  # the task interface, imported (with torch) only when asked for
    if name in ("Meter", "ParityReport", "Task"):
        from cvrecipe.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'cvrecipe.tasks' has no attribute '{name}'")
