"""Experiment tracking: an MLflow logger that plugs into the training loop as a callback.

Enabled with `track.mlflow=true`. Parameters are the flattened config (`train.lr`, `model.name`,
...), metrics are logged once per epoch (step = epoch), and the run folder's files (config, the
best weights, metrics; later the evaluation and the HTML report) become the MLflow run's
artifacts. The MLflow run id is kept in RUN/mlflow.json, so a resumed run, `cvrecipe run`'s
report and `cvrecipe report RUN` all add to the same MLflow run. Everything goes through
`MlflowClient` with an explicit tracking URI: no process-wide active run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cvrecipe.config import Config, TrackConfig, to_dict

DEFAULT_URI = "sqlite:///mlflow.db"  # a local SQLite store in the working directory
RUN_FILE = "mlflow.json"  # in the run folder: {"tracking_uri", "experiment_id", "run_id"}
MODEL_FILES = ("config.yaml", "run.json", "metrics.csv", "best.safetensors", "skipped_files.txt")
REPORT_FILES = ("eval.json", "report.html", "calibration.json")


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} → {"train.lr": "0.1"}; MLflow parameters are strings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return out


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise RuntimeError("track.mlflow=true needs MLflow: pip install 'cvrecipe[track]'") from err
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, creating it on first use. For a SQLite store the artifacts go beside the
    database file (not into the working directory's ./mlruns, MLflow's default)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MlflowLogger:
    """Training callback: on_train_start / on_epoch_end / on_train_end (see cvrecipe.train.loop.fit)."""

    def __init__(self, track: TrackConfig):
        self.uri = track.mlflow_uri or DEFAULT_URI
        self.experiment = track.experiment
        self.client = _client(self.uri)
        self.run_id: str | None = None

    def on_train_start(self, model, cfg: Config, run_dir: Path) -> None:
        run_file = Path(run_dir) / RUN_FILE
        if run_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = json.loads(run_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = _experiment_id(self.client, self.experiment, self.uri)
        run = self.client.create_run(experiment_id, run_name=Path(run_dir).name,
                                     tags={"cvrecipe.run_dir": str(Path(run_dir).resolve()),
                                           "cvrecipe.model": cfg.model.name, "cvrecipe.data": cfg.data.name})
        self.run_id = run.info.run_id
        run_file.write_text(json.dumps({"tracking_uri": self.uri, "experiment_id": experiment_id,
                                        "run_id": self.run_id}, indent=1))
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(to_dict(cfg)).items()]
        params.append(Param("num_parameters", str(sum(p.numel() for p in model.parameters()))))
        for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def on_epoch_end(self, row: dict, model) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(row["epoch"])) for k, v in row.items() if k not in ("epoch", "step")]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, history: list[dict], run_dir: Path) -> None:
        _log_files(self.client, self.run_id, Path(run_dir), MODEL_FILES, "model")
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_train_failed(self, error: BaseException) -> None:
        """A training that raised (a crash, a diverged loss: FAILED) or was interrupted (KILLED)
        does not stay RUNNING; the error is kept as the run's tag cvrecipe.error."""
        if self.run_id is None:  # failed before its MLflow run was created
            return
        text = " ".join(str(error).split()) or type(error).__name__
        self.client.set_tag(self.run_id, "cvrecipe.error", f"{type(error).__name__}: {text}"[:5000])
        self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def _log_files(client, run_id: str, run_dir: Path, names: tuple[str, ...], artifact_path: str) -> None:
    for name in names:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name), artifact_path)


def log_report(run_dir: Path) -> str | None:
    """Attach the run's evaluation and report (report.html, plots/) to its MLflow run, if it has one.
    Returns the MLflow run id, or None when the run was not tracked."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    info = json.loads(run_file.read_text())
    client = _client(info["tracking_uri"])
    _log_files(client, info["run_id"], run_dir, REPORT_FILES, "report")
    if (run_dir / "plots").is_dir():
        client.log_artifacts(info["run_id"], str(run_dir / "plots"), "report/plots")
    return info["run_id"]
