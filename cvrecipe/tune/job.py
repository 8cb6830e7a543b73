"""`cvrecipe tune`: check the recipe and the space, create (or resume) the study, start the local
workers, show one live line per worker, then write best.yaml, report.html and the top trials.

    runs/<study>/  study.db (SQLite storage, unless --storage names another)  best.yaml  report.html
                   trial-000/ trial-001/ ...  (each a run folder, plus trial.json)
                   workers/   (each local worker's log and status line)

Several machines share a study by running the same command against one database (--storage
postgresql+psycopg://...). Killing the command at any point loses at most the running trials'
progress: the next run keeps every ended trial and retries the running ones.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from cvrecipe.config import ConfigError, apply_overrides, from_dict, read_recipe, resolve_space
from cvrecipe.tune.report import dashboard_command, report
from cvrecipe.tune.space import load_space
from cvrecipe.tune.study import (PRUNERS, SAMPLERS, TuneSettings, check_metric, create_study, default_storage,
                                 enqueue_grid, grid_size, load_study, safe_url, summary, worker_threads)

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def prepare(recipe: str, overrides: list[str], space: str | Path, trials: int, storage: str | None = None,
            study: str | None = None, sampler: str = "tpe", pruner: str = "median", metric: str | None = None,
            direction: str | None = None, seed: int = 0, heartbeat_s: int = 10) -> TuneSettings:
    """Everything checked before any trial runs: the recipe with its overrides, the space against
    the config's rules, the metric, the budget. Raises ConfigError naming what is wrong."""
    base = apply_overrides(read_recipe(recipe), overrides)
    cfg = from_dict(base)
    name = study or f"{cfg.name}-tune"
    if not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"--study {name!r}: expected letters, digits, '.', '_' or '-' (it names a folder)")
    if trials < 1:
        raise ConfigError(f"--trials {trials}: expected at least 1")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ConfigError(f"--sampler {sampler} / --pruner {pruner}: expected one of {SAMPLERS} / {PRUNERS}")
    space_obj = load_space(resolve_space(space), base)
    metric = check_metric(metric or cfg.checkpoint.monitor, base)
    if direction is None:
        mode = cfg.monitor_mode if metric == cfg.checkpoint.monitor else ("min" if metric.endswith("loss") else "max")
    elif direction in ("max", "min"):
        mode = direction
    else:
        raise ConfigError(f"--direction {direction}: expected max or min")
    if sampler == "grid":
        trials = min(trials, grid_size(space_obj))  # the grid's points, each once
    runs_dir = str(Path(cfg.runs_dir) / name)
    return TuneSettings(study=name, storage=storage or default_storage(runs_dir), base=base, space=space_obj.to_dict(),
                        trials=trials, metric=metric, direction="maximize" if mode == "max" else "minimize",
                        runs_dir=runs_dir, sampler=sampler, pruner=pruner, seed=seed, heartbeat_s=heartbeat_s)


def tune(settings: TuneSettings, workers: int = 1, console: Console | None = None) -> Path:
    """Run the study to its budget with `workers` local processes; returns the report's path."""
    console = console or Console(soft_wrap=True)
    study = create_study(settings)
    Path(settings.runs_dir).mkdir(parents=True, exist_ok=True)
    if settings.sampler == "grid":
        enqueue_grid(study, settings)
    counts = summary(study.get_trials(deepcopy=False))
    console.print(f"study {settings.study} in {safe_url(settings.storage)}: {counts['ended']} of {settings.trials} "
                  f"trials ended; {settings.sampler} sampler, {settings.pruner} pruner, {settings.metric} "
                  f"({settings.direction}); trial folders in {settings.runs_dir}/", highlight=False)
    console.print(f"live dashboard: {dashboard_command(settings.storage)}", highlight=False)
    if counts["ended"] < settings.trials:
        run_workers(settings, workers, console)
    return report(study, settings, console)


def run_workers(settings: TuneSettings, workers: int, console: Console) -> None:
    """Start the local workers (each with cores / workers torch threads), show their live lines,
    and wait for them. Ctrl-C (or SIGTERM) stops them; their running trials are queued again."""
    folder = Path(settings.runs_dir) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    threads = worker_threads(workers)
    procs = []
    for i in range(workers):
        status = folder / f"worker-{i}.json"
        status.unlink(missing_ok=True)
        log = open(folder / f"worker-{i}.log", "a")
        cmd = [sys.executable, "-m", "cvrecipe.tune.worker", "--storage", settings.storage, "--study", settings.study,
               "--index", str(i), "--workers", str(workers), "--threads", str(threads), "--seed", str(settings.seed),
               "--heartbeat", str(settings.heartbeat_s), "--status", str(status)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), status, log))
    console.print(f"{workers} worker(s), {threads} torch thread(s) each; logs in {folder}/", highlight=False)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt), signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        _watch(procs, console)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        for _, _, log in procs:
            log.close()
    failed = [(i, p.returncode) for i, (p, _, _) in enumerate(procs) if p.returncode not in (0, None)]
    for i, code in failed:
        tail = (folder / f"worker-{i}.log").read_text().splitlines()[-15:]
        console.print(f"[red]worker {i} exited with status {code}; the end of its log:[/]")
        console.print("\n".join(tail), markup=False, highlight=False)
    if failed and len(failed) == workers:
        raise RuntimeError(f"every worker failed; see {folder}/worker-*.log")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _watch(procs: list, console: Console) -> None:
    """Until every worker has exited: one live line per worker (a plain line per change when the
    output is not a terminal)."""
    shown: dict[int, tuple] = {}
    live = Live(Text(""), console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
    if live is not None:
        live.start()
    try:
        while any(p.poll() is None for p, _, _ in procs):
            lines = [worker_line(i, _read(status), p.poll()) for i, (p, status, _) in enumerate(procs)]
            if live is not None:
                live.update(Text("\n".join(lines)))
            else:
                for i, (p, status, _) in enumerate(procs):
                    info = _read(status)
                    key = (info.get("trial"), info.get("epoch"), info.get("state"))
                    if info and shown.get(i) != key:
                        shown[i] = key
                        console.print(lines[i], highlight=False)
            time.sleep(0.5)
        if live is not None:
            live.update(Text("\n".join(worker_line(i, _read(s), p.poll()) for i, (p, s, _) in enumerate(procs))))
    finally:
        if live is not None:
            live.stop()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def worker_line(index: int, info: dict, exit_code: int | None) -> str:
    """worker 0  trial 7  epoch 3/6  best 0.9123 (trial 4)  12/24 ended, 3 pruned, 0 failed  ETA 5m12s"""
    if not info:
        return f"worker {index}  starting"
    if exit_code is not None:
        doing = "done" if exit_code == 0 else f"exited ({exit_code})"
    elif info.get("trial") is not None and info.get("state") == "training":
        doing = f"trial {info['trial']}  epoch {info['epoch']}/{info['epochs']}"
    else:
        doing = info.get("state", "")
    best = f"best {info['best']:.4f} (trial {info['best_trial']})" if info.get("best") is not None else "best -"
    eta = info.get("eta_s")
    eta_text = "" if eta is None or exit_code is not None else f"  ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    return (f"worker {index}  {doing:<22}  {best}  {info.get('ended', 0)}/{info.get('budget', 0)} ended, "
            f"{info.get('pruned', 0)} pruned, {info.get('failed', 0)} failed{eta_text}")


def _stop(procs: list, timeout_s: float = 30.0) -> None:
    """Ask the workers to stop (SIGINT: each queues its running trial again), then make sure."""
    for p, _, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for p, _, _ in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def rebuild_report(study: str, storage: str | None = None, console: Console | None = None) -> Path:
    """`cvrecipe tune --report STUDY`: best.yaml, report.html and the table, from the storage alone."""
    console = console or Console(soft_wrap=True)
    if storage is None:
        path = Path("runs") / study / "study.db"
        if not path.is_file():
            raise ConfigError(f"no study storage at {path}; give --storage URL for a study kept elsewhere")
        storage = default_storage(path.parent)
    study_obj, settings = load_study(storage, study)
    return report(study_obj, settings, console)
