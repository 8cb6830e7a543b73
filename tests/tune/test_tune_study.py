"""`cvrecipe tune` end to end on digits, with real worker processes and a real SQLite storage:
two workers share a study, a failing trial is recorded while the study goes on, a pruned trial
says so in its run folder, a SIGKILLed study resumes without losing or repeating a trial, the
best recipe re-runs to the same value, and the report renders in Chromium."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch
from optuna.trial import TrialState
from rich.console import Console

from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.train.job import train

from tune_helpers import env, load, run_tune, sqlite_url, tune_command, write_space

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

GRID = """# lr 1e6 makes the loss NaN in the first epoch: those trials fail (TrainingDiverged)
optim.lr: {choice: [0.05, 0.2, 1.0e6]}
model.dropout: {choice: [0.0, 0.3]}
"""


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory):
    """A 6-point grid on digits, 2 epochs per trial, run by 2 worker processes."""
    work = tmp_path_factory.mktemp("grid")
    space = write_space(work / "space.yaml", GRID)
    out = run_tune(work, space, "--trials", "10", "--sampler", "grid", "--pruner", "none", "--workers", "2",
                   "--study", "grid", "train.epochs=2", cache=work / "cache")
    return work, out, load(sqlite_url(work, "grid"), "grid")


def test_two_workers_share_the_study_and_a_failing_trial_does_not_stop_it(grid_study):
    work, out, study = grid_study
    # a worker that saw a queued point just as the other took it starts one trial more, which stops
    # before training and is marked over budget (see study.over_budget): at most one per extra worker
    extra = [t for t in study.get_trials() if t.user_attrs.get("over_budget")]
    assert len(extra) <= 1 and all(t.state == TrialState.FAIL and "run_dir" not in t.user_attrs for t in extra)
    trials = [t for t in study.get_trials() if not t.user_attrs.get("over_budget")]
    assert len(trials) == 6  # the budget of 10 is capped at the grid's 6 points
    assert sorted((t.params["optim.lr"], t.params["model.dropout"]) for t in trials) == \
        sorted((lr, d) for lr in (0.05, 0.2, 1e6) for d in (0.0, 0.3))  # each point exactly once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both worker processes took trials
    for t in trials:
        info = json.loads((Path(t.user_attrs["run_dir"]) / "trial.json").read_text())
        assert info["trial"] == t.number and info["params"] == t.params
        if t.params["optim.lr"] == 1e6:
            assert t.state == TrialState.FAIL and t.user_attrs["error"].startswith("TrainingDiverged: loss became nan")
            assert info["state"] == "failed" and info["error"] == t.user_attrs["error"]
        else:
            assert t.state == TrialState.COMPLETE and info["state"] == "complete"
            rows = list(csv.DictReader(open(Path(t.user_attrs["run_dir"]) / "metrics.csv")))
            assert len(rows) == 2 and info["value"] == t.value == min(float(r["val_loss"]) for r in rows)
            assert (Path(t.user_attrs["run_dir"]) / "best.safetensors").is_file()
    assert "top trials of grid" in out.stdout and "optuna-dashboard sqlite:///" in out.stdout
    assert "worker 0" in out.stdout and "worker 1" in out.stdout  # the live lines


def test_the_best_recipe_reruns_to_the_same_value(grid_study, tmp_path):
    work, _, study = grid_study
    best_yaml = work / "runs" / "grid" / "best.yaml"
    cfg = load_config(best_yaml, [f"runs_dir={tmp_path}", "train.sanity=false"])
    assert cfg.optim.lr == study.best_params["optim.lr"] and cfg.model.dropout == study.best_params["model.dropout"]
    assert cfg.train.epochs == 2 and cfg.name == "grid-best"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker (2 workers on 2 cores), so the arithmetic is the same
    try:
        run_dir = train(cfg, console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert min(float(r["val_loss"]) for r in rows) == pytest.approx(study.best_value, rel=1e-4)


def test_the_report_renders_in_chromium(grid_study, tmp_path, monkeypatch):
    from pagecheck import view_page

    work, _, _ = grid_study
    report = work / "runs" / "grid" / "report.html"
    html = report.read_text()
    assert "<script" not in html and 'src="http' not in html and "href=\"http" not in html  # self-contained
    before = report.stat().st_mtime_ns
    monkeypatch.chdir(work)
    assert main(["tune", "--report", "grid"]) == 0  # rebuilt from the storage alone
    assert report.stat().st_mtime_ns > before
    info = view_page(report, tmp_path / "tune-report.png")
    assert info["title"] == "Study grid"
    for heading in ("Best trial", "Trials", "Optimisation history", "Learning curves", "Parameter importances",
                    "Parallel coordinates", "Slices", "The best trial's curves"):
        assert heading in info["headings"]
    assert len(info["images"]) == 6 and all(i["width"] > 100 and i["shown"] > 100 for i in info["images"])
    assert 6 in info["tables"]  # the trials table: every trial, failed ones too
    if os.environ.get("CVRECIPE_UPDATE_DOCS") == "1":
        import shutil

        shutil.copy(tmp_path / "tune-report.png", Path(__file__).resolve().parents[2] / "docs/images/tune-report.png")


def test_a_pruned_trial_leaves_its_run_folder_saying_so(tmp_path):
    """A real Optuna pruner (ThresholdPruner: any val_loss above 0 is too high) stops the trial after
    its first epoch; the run folder keeps that epoch and says the trial was pruned."""
    from cvrecipe.tune import prepare
    from cvrecipe.tune.worker import Status, objective

    space = write_space(tmp_path / "space.yaml", "optim.lr: {float: [0.05, 0.2], log: true}\n")
    settings = prepare("digits-quick", ["train.epochs=3", f"runs_dir={tmp_path / 'runs'}"], space, trials=1,
                       storage="sqlite:///unused.db")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    status = Status(tmp_path / "status.json", 0, 1)
    study.optimize(objective(study, settings, status, Console(quiet=True)), n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.PRUNED and trial.user_attrs["epochs"] == 1
    run_dir = Path(trial.user_attrs["run_dir"])
    info = json.loads((run_dir / "trial.json").read_text())
    assert info["state"] == "pruned" and info["epochs"] == 1 and "after epoch 1" in info["note"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 1 and info["value"] == pytest.approx(float(rows[0]["val_loss"]))
    assert "epochs: 3" in (run_dir / "config.yaml").read_text()  # it was meant to train 3
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "idle"


def test_sigkill_mid_study_then_resume_keeps_every_trial_once(tmp_path):
    """Kill -9 the tune command while a trial runs; the rerun keeps the ended trials, fails the dead
    worker's trial by its stale heartbeat, retries it with the same parameters, and stops at the budget."""
    space = write_space(tmp_path / "space.yaml", "optim.lr: {float: [0.05, 0.3], log: true}\n"
                                                 "model.dropout: {float: [0.0, 0.3]}\n")
    # 8 epochs: a trial runs for a few seconds, so the watcher below sees one between its epochs
    args = ["--trials", "4", "--pruner", "none", "--heartbeat", "1", "--study", "killed", "train.epochs=8"]
    proc = subprocess.Popen(tune_command(space, *args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    worker_file = tmp_path / "runs/killed/workers/worker-0.json"
    try:
        running = _wait_for_a_running_trial(sqlite_url(tmp_path, "killed"), ended=1)
        # SIGKILL the worker and the tune command together, as a machine going down would: a worker left
        # to notice its parent's death alone could still finish the running trial
        os.kill(json.loads(worker_file.read_text())["pid"], signal.SIGKILL)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    url = sqlite_url(tmp_path, "killed")
    worker_pid = json.loads(worker_file.read_text())["pid"]
    _wait_gone(worker_pid)
    before = {t.number: t.value for t in load(url, "killed").get_trials() if t.state == TrialState.COMPLETE}
    assert [t.state for t in load(url, "killed").get_trials()].count(TrialState.RUNNING) == 1

    out = run_tune(tmp_path, space, *args)
    assert f"{len(before)} of 4 trials ended" in out.stdout
    trials = load(url, "killed").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # the budget counts across both runs
    assert {n: v for n, v in ((t.number, t.value) for t in complete) if n in before} == before  # kept as they were
    dead = trials[running.number]
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs  # failed by its stale heartbeat
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert retry.state == TrialState.COMPLETE and retry.params == running.params
    assert len(trials) == 5  # nothing else was run twice
    run_dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(run_dirs)) == 4 and all(len(list(csv.DictReader(open(Path(d) / "metrics.csv")))) == 8
                                           for d in run_dirs)
    dead_info = json.loads((Path(dead.user_attrs["run_dir"]) / "trial.json").read_text())
    assert dead_info["state"] == "failed" and "no heartbeat" in dead_info["note"]


def _wait_for_a_running_trial(url: str, ended: int, timeout_s: float = 900):
    """The first trial seen running (one epoch done at least) after `ended` trials completed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if not Path(url[len("sqlite:///"):]).is_file():
            continue
        try:
            trials = load(url, "killed").get_trials()
        except (KeyError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # the study, or Optuna's tables, still being created by the tune command
            continue
        if sum(t.state == TrialState.COMPLETE for t in trials) >= ended:
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("epochs", 0) >= 1]
            if running:
                return running[0]
    pytest.fail(f"no running trial after {ended} complete ones within {timeout_s} s")


def _wait_gone(pid: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():  # gone, or dead and not yet reaped
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"worker {pid} outlived the killed tune process")
