"""The Optuna study behind `cvrecipe tune`: its storage, its settings, its sampler and pruner, and
how its trial budget is counted.

The study is the single source of truth. Its settings (the base recipe with the command line's
overrides, the search space, the metric and its direction, the trial budget) are stored in the
study itself (a user attribute), so a worker needs only the storage URL and the study name: local
worker processes, a second machine on a shared PostgreSQL database, and `cvrecipe tune --report`
all read the same settings.

The budget counts trials that ended (complete, pruned, or failed with an error of their own:
NaN, out of memory, a bad combination) plus those running or queued. Trials whose worker died
(no heartbeat for two intervals) or was interrupted are failed without an error, do not count,
and are queued again with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from cvrecipe.config import ConfigError, from_dict
from cvrecipe.tune.space import Space

ATTR = "cvrecipe"  # the study user attribute holding the settings
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
MAX_RETRY = 3  # a trial whose worker dies is queued again at most this many times
# settings a rerun (or another machine) must share with the stored study; the rest may change
FIXED = ("base", "space", "metric", "direction")


@dataclass
class TuneSettings:
    study: str
    storage: str  # SQLAlchemy URL
    base: dict  # the raw recipe with the command line's overrides applied
    space: dict  # Space.to_dict()
    trials: int  # the budget, counted over every worker and every run of the command
    metric: str  # a per-epoch metric of the run, e.g. val_acc
    direction: str  # maximize | minimize
    runs_dir: str  # parent of the trial folders: <recipe's runs_dir>/<study>
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    heartbeat_s: int = 10  # a RUNNING trial without a heartbeat for 2x this long belongs to a dead worker

    @property
    def space_obj(self) -> Space:
        return Space.from_stored(self.space)

    def stored(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("storage", "heartbeat_s", "seed")}


def default_storage(runs_dir: str | Path) -> str:
    """SQLite in <runs_dir>/study.db (an absolute path, so worker processes agree)."""
    path = Path(runs_dir).resolve() / "study.db"
    return f"sqlite:///{path}"


def open_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """The study's storage: any SQLAlchemy URL; heartbeats on, stale trials retried."""
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several workers write to one file: wait for the lock; transactions are begun by _begin_immediate
        kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}}
    else:
        kwargs = {"pool_pre_ping": True}
    import sqlalchemy.event
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                    heartbeat_stale_trial_callback=StaleTrialRetry())
            if url.startswith("sqlite:///"):
                sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as err:
            # two processes creating Optuna's tables in a new database at once: one loses the race
            # (PostgreSQL: "duplicate key ... pg_type"; SQLite: "table ... already exists"); the tables
            # are there when it tries again
            lost_race = not isinstance(err, sqlalchemy.exc.OperationalError) or "already exists" in str(err)
            if attempt == 4 or not lost_race:
                raise
            time.sleep(1.0 + attempt)


def _begin_immediate(connection) -> None:
    """SQLite: take the write lock when a transaction begins. Optuna claims a queued trial by reading
    that it is WAITING, then setting it RUNNING; in SQLite's default deferred transactions two workers
    could both read WAITING and both run the same trial (seen with grid points queued for 2 workers)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


class StaleTrialRetry:
    """A trial whose worker stopped sending heartbeats: queue it again (same parameters), and say so
    in its run folder when that folder is on this machine."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        note_in_run_folder(trial, {"state": "failed", "error": None,
                                   "note": "its worker stopped (no heartbeat); the trial was queued again"})


def note_in_run_folder(trial: FrozenTrial | optuna.Trial, update: dict) -> None:
    """Merge `update` into <run folder>/trial.json, when the trial has a run folder here."""
    run_dir = trial.user_attrs.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        return
    path = Path(run_dir) / "trial.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(update)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(path)


def create_study(settings: TuneSettings) -> optuna.Study:
    """Create the study, or load it when it exists and check that it tunes the same thing."""
    storage = open_storage(settings.storage, settings.heartbeat_s)
    direction = settings.direction
    study = optuna.create_study(storage=storage, study_name=settings.study, direction=direction,
                                load_if_exists=True)
    stored = study.user_attrs.get(ATTR)
    if stored is not None:
        changed = [k for k in FIXED if stored.get(k) != settings.stored()[k]]
        if changed:
            raise ConfigError(f"study '{settings.study}' in {safe_url(settings.storage)} already tunes a different "
                              f"{', '.join(changed)}; resume it with the same recipe, overrides and space, or "
                              f"choose another --study name")
    study.set_user_attr(ATTR, settings.stored())  # the budget, sampler and pruner may change between runs
    return study


def load_study(storage: str, name: str, heartbeat_s: int = 10) -> tuple[optuna.Study, TuneSettings]:
    """An existing study and its settings (for workers and --report)."""
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat_s))
    except KeyError:
        raise ConfigError(f"no study named '{name}' in {safe_url(storage)}") from None
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        raise ConfigError(f"study '{name}' in {safe_url(storage)} was not created by cvrecipe tune")
    return study, TuneSettings(storage=storage, heartbeat_s=heartbeat_s, **stored)


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def make_sampler(settings: TuneSettings, worker_seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=worker_seed)
        if settings.sampler == "grid":
            # every grid point is queued once by enqueue_grid; a queued trial's values are fixed, so
            # this sampler draws nothing (Optuna's GridSampler, drawing in each worker, can repeat a point)
            return optuna.samplers.RandomSampler(seed=worker_seed)
        # a quarter of the budget (4 to 10 trials) is drawn at random before TPE models the rest;
        # group + multivariate handle conditional entries; constant_liar keeps parallel workers apart
        startup = max(4, min(10, settings.trials // 4))
        return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=startup, multivariate=True,
                                          group=True, constant_liar=True)


def make_pruner(settings: TuneSettings, epochs: int) -> optuna.pruners.BasePruner:
    if settings.pruner == "median":
        # a trial stops after an epoch where it is worse than the median of earlier trials at that
        # epoch, once 4 trials have ended (one fifth of the budget, at least 2)
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(4, settings.trials // 5)), n_warmup_steps=0)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def enqueue_grid(study: optuna.Study, settings: TuneSettings) -> int:
    """Queue the grid points that no trial holds yet, as many as the budget has room for; workers
    then take them one by one (a queued trial goes to exactly one worker). Returns the number queued."""
    import itertools

    grid = settings.space_obj.grid()
    keys = list(grid)
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    held = {tuple(_params(t).get(k) for k in keys) for t in trials}
    points = [p for p in itertools.product(*grid.values()) if p not in held][:max(0, settings.trials - len(trials))]
    for point in points:
        study.enqueue_trial(dict(zip(keys, point)))
    return len(points)


def _params(trial: FrozenTrial) -> dict:
    """A trial's values: drawn, or fixed when it was queued and has not started."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def grid_size(space: Space) -> int:
    size = 1
    for values in space.grid().values():
        size *= len(values)
    return size


# ---- the budget ---------------------------------------------------------------------------------

def ended(trial: FrozenTrial) -> bool:
    """A trial that used its place in the budget and will not run again."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def counted(trial: FrozenTrial) -> bool:
    """A trial that holds a place in the budget: ended, running or queued."""
    return ended(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def is_retry(trial: FrozenTrial | optuna.Trial) -> bool:
    """A queued copy of a trial whose worker died: it takes the place of the one it replaces."""
    return "failed_trial" in getattr(trial, "system_attrs", {})


def over_budget(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """Two workers that see one place left may both start a trial; the later-numbered one is over."""
    if is_retry(trial):
        return False
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
    return len(earlier) >= budget


def summary(trials: list[FrozenTrial]) -> dict:
    """Counts for the progress line and the end of the run."""
    states = {s: 0 for s in ("complete", "pruned", "failed", "running", "waiting")}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            states["complete"] += 1
        elif t.state == TrialState.PRUNED:
            states["pruned"] += 1
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            states["failed"] += 1
        elif t.state == TrialState.RUNNING:
            states["running"] += 1
        elif t.state == TrialState.WAITING:
            states["waiting"] += 1
    states["ended"] = states["complete"] + states["pruned"] + states["failed"]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if ended(t) and t.datetime_start and t.datetime_complete]
    states["mean_trial_s"] = sum(durations) / len(durations) if durations else None
    return states


def check_metric(metric: str, base: dict) -> str:
    """The metric a trial is scored on: a per-epoch metric of the recipe's task."""
    from cvrecipe.config import produced_metrics

    cfg = from_dict(base)
    metrics = produced_metrics(cfg.task)
    if metric not in metrics:
        raise ConfigError(f"--metric {metric}: expected one of {', '.join(metrics)} (what a {cfg.task} run produces)")
    return metric


def worker_threads(workers: int) -> int:
    """Torch threads for each of `workers` local processes: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def fail_stale(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials whose heartbeat is stale: their worker is dead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
