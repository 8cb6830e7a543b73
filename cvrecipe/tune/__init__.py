"""Hyperparameter search with Optuna: `cvrecipe tune` (job.py), the search space (space.py), the
study and its budget (study.py), the worker processes (worker.py), the report (report.py)."""
from cvrecipe.tune.job import prepare, rebuild_report, tune

__all__ = ["prepare", "rebuild_report", "tune"]
