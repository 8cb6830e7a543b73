"""Two `cvrecipe tune` commands, as on two machines, share one study through a real PostgreSQL.

The cluster is a throw-away one on 127.0.0.1 (tests/postgres_helpers.py); where PostgreSQL or the
psycopg driver is missing, the test skips with the reason."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from postgres_helpers import postgres_cluster
from tune_helpers import env, load, tune_command, write_space

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_cluster() as url:
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)  # SQLAlchemy's name for the driver


def test_two_machines_share_one_study_through_postgres(postgres_url, tmp_path):
    space = write_space(tmp_path / "space.yaml", "optim.lr: {float: [0.05, 0.3], log: true}\n"
                                                 "model.dropout: {float: [0.0, 0.3]}\n")
    args = ["--trials", "4", "--pruner", "none", "--storage", postgres_url, "--study", "shared", "train.epochs=2"]
    machines = [tmp_path / "a", tmp_path / "b"]  # each with its own working folder, as two machines would be
    procs = []
    for i, cwd in enumerate(machines):
        cwd.mkdir()
        procs.append(subprocess.Popen(tune_command(space, *args, "--seed", str(i)), cwd=cwd, env=env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    trials = load(postgres_url, "shared").get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4  # the budget held over both commands
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("over_budget") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}) == 2
    folders = [Path(t.user_attrs["run_dir"]) for t in trials if t.state == TrialState.COMPLETE]
    assert all((f / "metrics.csv").is_file() for f in folders)
    assert {f.parents[2] for f in folders} == set(machines)  # each machine ran trials in its own runs/
    for cwd in machines:
        assert (cwd / "runs" / "shared" / "best.yaml").is_file() and (cwd / "runs" / "shared" / "report.html").is_file()
    assert "optuna-dashboard postgresql+psycopg://postgres@127.0.0.1:" in outputs[0]
