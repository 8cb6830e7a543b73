"""A tuning worker: takes trials from the study until its budget is spent.

Each trial is a normal run of the train job, in <runs_dir>/trial-NNN/ (config.yaml, run.json,
metrics.csv, best.safetensors, last.ckpt), plus trial.json: the trial's number, parameters,
state (running, complete, pruned, failed, interrupted), value and error. After every epoch the
trial reports the metric to the pruner, which may stop it (Optuna's TrialPruned).

Started by `cvrecipe tune` as `python -m cvrecipe.tune.worker --storage URL --study NAME ...`;
it reads everything else from the study. It dies with the process that started it (Linux), so a
killed `cvrecipe tune` leaves no worker behind: its running trial is retried by the next run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from rich.console import Console

from cvrecipe.train.parent import die_with_parent
from cvrecipe.tune.space import build_config
from cvrecipe.tune.study import (TuneSettings, counted, ended, fail_stale, load_study, make_pruner, make_sampler,
                                 over_budget, summary)


class OverBudget(Exception):
    """Another worker took the last place in the budget first."""


class TrialReporter:
    """Train-loop callback of one trial: says where its run folder is, reports the metric after
    every epoch to the pruner (raising TrialPruned when told to stop) and updates the status line."""

    def __init__(self, trial: optuna.Trial, params: dict, metric: str, status: "Status"):
        self.trial, self.params, self.metric, self.status = trial, params, metric, status
        self.run_dir: Path | None = None
        self.epochs = 0
        self.values: list[float] = []

    def on_train_start(self, model, cfg, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.trial.set_user_attr("run_dir", str(self.run_dir.resolve()))
        self.write({"study": self.trial.study.study_name, "trial": self.trial.number, "params": self.params,
                    "metric": self.metric, "state": "running", "value": None, "epochs": 0, "error": None,
                    "worker": worker_name(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.status.update(trial=self.trial.number, epoch=0, epochs=cfg.train.epochs, state="training")

    def on_epoch_end(self, row: dict, model) -> None:
        value, epoch = float(row[self.metric]), int(row["epoch"])
        self.epochs = epoch
        self.values.append(value)
        self.trial.set_user_attr("epochs", epoch)
        self.status.update(epoch=epoch)
        if not math.isfinite(value):
            return  # nothing a pruner can compare; a NaN loss stops the run by itself (TrainingDiverged)
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4f} after epoch {epoch} is behind the earlier trials")

    def write(self, update: dict) -> None:
        if self.run_dir is None:
            return
        path = self.run_dir / "trial.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.update(update)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=1, default=str))
        tmp.replace(path)


def objective(study: optuna.Study, settings: TuneSettings, status: "Status", console: Console):
    """The function Optuna calls once per trial: its value is the best epoch's metric."""
    from cvrecipe.train.job import train

    space = settings.space_obj
    maximize = settings.direction == "maximize"

    def run_trial(trial: optuna.Trial) -> float:
        if over_budget(study, trial, settings.trials):
            trial.set_user_attr("over_budget", True)
            raise OverBudget(f"trial {trial.number}: the budget of {settings.trials} trials is taken")
        trial.set_user_attr("worker", worker_name())
        params: dict = {}
        reporter = None
        t0 = time.perf_counter()
        try:
            params = space.suggest(trial)
            cfg = build_config(settings.base, params, fixed={
                "name": f"trial-{trial.number:03d}", "runs_dir": settings.runs_dir,
                "train.sanity": False})  # the checks answer for the recipe, not for each draw of it
            reporter = TrialReporter(trial, params, settings.metric, status)
            console.rule(f"trial {trial.number}: {params}")
            train(cfg, console=console, callbacks=[reporter], keep_failed=True)
            values = [v for v in reporter.values if math.isfinite(v)]
            if not values:
                raise RuntimeError(f"no finite {settings.metric} in any epoch")
            value = max(values) if maximize else min(values)
            reporter.write({"state": "complete", "value": value, "epochs": reporter.epochs,
                            "seconds": round(time.perf_counter() - t0, 1)})
            return value
        except optuna.TrialPruned as pruned:
            reporter.write({"state": "pruned", "value": reporter.values[-1], "epochs": reporter.epochs,
                            "note": str(pruned), "seconds": round(time.perf_counter() - t0, 1)})
            raise
        except KeyboardInterrupt:
            _queue_again(study, trial)
            if reporter is not None:
                reporter.write({"state": "interrupted", "note": "stopped by the user; the trial was queued again"})
            raise
        except Exception as err:  # NaN (TrainingDiverged), out of memory, a bad combination (ConfigError), ...
            error = f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", error[:2000])
            if reporter is not None:
                reporter.write({"state": "failed", "error": error, "epochs": reporter.epochs})
            raise
        finally:
            status.update(state="idle")

    return run_trial


def _queue_again(study: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted trial (Ctrl-C) does not count: queue a copy with the same parameters."""
    from cvrecipe.tune.study import StaleTrialRetry

    frozen = study._storage.get_trial(trial._trial_id)
    StaleTrialRetry().retry(study, frozen)


def work(settings: TuneSettings, study: optuna.Study, status: "Status", console: Console) -> None:
    """Run trials until the budget is spent. When the remaining places are all held by running trials,
    wait: a running trial may belong to a dead worker, and is queued again once its heartbeat is stale."""
    run_trial = objective(study, settings, status, console)
    while True:
        trials = study.get_trials(deepcopy=False)
        status.study(summary(trials), settings.trials)
        if sum(ended(t) for t in trials) >= settings.trials:
            return
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if not waiting and sum(counted(t) for t in trials) >= settings.trials:
            status.update(state="waiting for running trials")
            time.sleep(min(5.0, settings.heartbeat_s))
            fail_stale(study)
            continue
        study.optimize(run_trial, n_trials=1, catch=(Exception,), gc_after_trial=False)


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"


class Status:
    """This worker's live line, as a small JSON file the `cvrecipe tune` process reads and shows."""

    def __init__(self, path: Path, index: int, workers: int):
        self.path, self.workers = path, workers
        self.info = {"worker": index, "pid": os.getpid(), "trial": None, "epoch": 0, "epochs": 0,
                     "state": "starting", "ended": 0, "pruned": 0, "failed": 0, "budget": 0, "best": None,
                     "best_trial": None, "eta_s": None}
        self.study_obj: optuna.Study | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def study(self, counts: dict, budget: int) -> None:
        best = _best(self.study_obj) if self.study_obj is not None else (None, None)
        left = max(0, budget - counts["ended"])
        eta = counts["mean_trial_s"] * left / self.workers if counts["mean_trial_s"] is not None else None
        self.update(ended=counts["ended"], pruned=counts["pruned"], failed=counts["failed"], budget=budget,
                    best=best[0], best_trial=best[1], eta_s=eta)

    def update(self, **fields) -> None:
        self.info.update(fields, updated=time.time())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info))
        tmp.replace(self.path)


def _best(study: optuna.Study) -> tuple[float | None, int | None]:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None, None
    return best.value, best.number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cvrecipe.tune.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", type=int, default=0, help="this worker's number on this machine (seeds the sampler)")
    p.add_argument("--workers", type=int, default=1, help="workers on this machine (for the ETA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat", type=int, default=10)
    p.add_argument("--status", type=Path, required=True, help="file for this worker's status line")
    args = p.parse_args(argv)
    die_with_parent()
    # a process started in the background inherits SIGINT ignored; the tune process stops us with it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ExperimentalWarning)
    study, settings = load_study(args.storage, args.study, args.heartbeat)
    epochs = build_config(settings.base, {}).train.epochs
    study.sampler = make_sampler(settings, args.seed * 1000 + args.index)
    study.pruner = make_pruner(settings, epochs)
    status = Status(args.status, args.index, args.workers)
    status.study_obj = study
    console = Console(soft_wrap=True, width=160)
    try:
        work(settings, study, status, console)
    except KeyboardInterrupt:
        status.update(state="interrupted")
        return 130
    status.update(state="done", trial=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
