"""The task registry: the one place task names are written (see cvrecipe/tasks/__init__.py)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class TaskEntry:
    name: str
    task: str  # "module:Class"
    spec: str
    answers: str
    report: str
    routes: str
    model_outputs: str  # the kind of model it trains (cvrecipe.models.registry's `outputs`)


TASKS: dict[str, TaskEntry] = {entry.name: entry for entry in (
    TaskEntry("classification", "cvrecipe.tasks.classification:Classification",
              "cvrecipe.tasks.spec.classification", "cvrecipe.tasks.answers.classification",
              "cvrecipe.evaluate.classification_report", "cvrecipe.serve.classification", "labels"),
    TaskEntry("segmentation", "cvrecipe.tasks.segmentation:Segmentation",
              "cvrecipe.tasks.spec.segmentation", "cvrecipe.tasks.answers.segmentation",
              "cvrecipe.evaluate.segmentation_report", "cvrecipe.serve.segmentation", "masks"),
    TaskEntry("detection", "cvrecipe.tasks.detection:Detection",
              "cvrecipe.tasks.spec.detection", "cvrecipe.tasks.answers.detection",
              "cvrecipe.evaluate.detection_report", "cvrecipe.serve.detection", "boxes"),
)}
DEFAULT_TASK = "classification"  # a config without `task`, and artifacts written before meta["task"] existed

def task_names() -> list[str]:
    return sorted(TASKS)


def entry(name: str | None) -> TaskEntry:
    """The registry entry of task `name` (None: the default task), or a ValueError naming the known ones."""
    name = DEFAULT_TASK if name is None else name
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known: {', '.join(task_names())}")
    return TASKS[name]


def resolve(path: str) -> Any:
    """A module ("a.b") or an attribute of one ("a.b:name"), imported on first use."""
    module, _, attr = path.partition(":")
    found: ModuleType = importlib.import_module(module)
    return getattr(found, attr) if attr else found


def task_of(meta: dict) -> str:
    """The task of a model's metadata (a checkpoint's, an export manifest's, a backend's info).
    Artifacts written before the task was recorded are classifiers: they migrate here, and only here."""
    return meta.get("task") or DEFAULT_TASK


def spec_of(name: str | None) -> ModuleType:
    """The task's torch-free facts (metrics, config rules, how images reach the model)."""
    return resolve(entry(name).spec)


def answers_of(name: str | None) -> ModuleType:
    """The task's torch-free answer layer."""
    return resolve(entry(name).answers)
