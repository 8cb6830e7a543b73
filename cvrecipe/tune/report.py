"""What a study leaves behind, rebuilt from its storage alone (`cvrecipe tune --report STUDY`):

    <runs_dir>/best.yaml     the best trial's full recipe: `cvrecipe run <runs_dir>/best.yaml`
    <runs_dir>/report.html   optimisation history, learning curves of every trial (pruning shows),
                             parameter importances, parallel coordinates, slices, the best trial's
                             curves; one self-contained file (images embedded, no script, no CDN)

and a table of the top trials in the terminal. The plots are Optuna's own matplotlib ones.
"""
from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import yaml
from matplotlib.figure import Figure
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from cvrecipe import pages
from cvrecipe.config import _show, to_dict
from cvrecipe.tune.space import build_config
from cvrecipe.tune.study import TuneSettings, ended, safe_url, summary

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def state_name(trial: FrozenTrial) -> str:
    if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
        return "over budget" if trial.user_attrs.get("over_budget") else "retried"  # worker died or interrupted
    return STATE_NAMES[trial.state]


def ranked(study: optuna.Study, settings: TuneSettings) -> list[FrozenTrial]:
    """Complete trials best first, then pruned ones by their last value, then failed ones."""
    trials = [t for t in study.get_trials(deepcopy=False) if ended(t)]
    sign = -1 if settings.direction == "maximize" else 1

    def key(t: FrozenTrial):
        order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}.get(t.state, 2)
        value = t.value if t.value is not None and math.isfinite(t.value) else None
        return order, value is None, sign * value if value is not None else 0.0

    return sorted(trials, key=key)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    return study.best_trial


def write_best_yaml(study: optuna.Study, settings: TuneSettings) -> Path | None:
    """The best trial's full resolved recipe, ready for `cvrecipe run`."""
    best = best_trial(study)
    if best is None:
        return None
    cfg = build_config(settings.base, best.params, fixed={"name": f"{settings.study}-best"})
    path = Path(settings.runs_dir) / "best.yaml"
    header = (f"# The best trial of study '{settings.study}': trial {best.number}, {settings.metric} "
              f"{best.value:.4f} (best epoch), {time.strftime('%Y-%m-%d')}.\n"
              f"# Tuned: {', '.join(f'{k}={_show(v)}' for k, v in best.params.items())}\n"
              f"# Reproduce it: cvrecipe run {path}\n")
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def top_table(study: optuna.Study, settings: TuneSettings, rows: int = 10) -> Table:
    keys = settings.space_obj.keys
    table = Table(title=f"top trials of {settings.study} ({settings.metric}, {settings.direction})")
    for name in ("#", "trial", "state", settings.metric, "epochs", "time", *keys):
        table.add_column(name, justify="left" if name == "state" else "right", overflow="fold")
    for rank, t in enumerate(ranked(study, settings)[:rows], 1):
        table.add_row(str(rank), str(t.number), state_name(t), _fmt(t.value), str(t.user_attrs.get("epochs", "")),
                      _duration(t), *(_param(t.params[k]) if k in t.params else "-" for k in keys))
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _param(value) -> str:
    """A parameter value, short: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else _show(value)


def _duration(t: FrozenTrial) -> str:
    if t.datetime_start is None or t.datetime_complete is None:
        return ""
    return f"{(t.datetime_complete - t.datetime_start).total_seconds():.0f}s"


def dashboard_command(storage: str) -> str:
    return f"optuna-dashboard {safe_url(storage)}"


# ---- the HTML report ----------------------------------------------------------------------------

def write_report(study: optuna.Study, settings: TuneSettings) -> Path:
    trials = study.get_trials(deepcopy=False)
    counts = summary(trials)
    best = best_trial(study)
    epochs = sum(int(t.user_attrs.get("epochs", 0)) for t in trials)
    body = [pages.cards([(_fmt(best.value) if best else "-", f"best {settings.metric}"),
                         (f"{counts['ended']}/{settings.trials}", "trials ended"),
                         (str(counts["complete"]), "complete"), (str(counts["pruned"]), "pruned"),
                         (str(counts["failed"]), "failed"), (str(epochs), "epochs trained")])]
    if best is not None:
        body += ["<h2>Best trial</h2>",
                 f'<p>trial {best.number}: {pages.esc(settings.metric)} {best.value:.4f}; its recipe is '
                 f'<code>{pages.esc(Path(settings.runs_dir) / "best.yaml")}</code>.</p>',
                 pages.table(["parameter", "value"], [[k, _param(v)] for k, v in best.params.items()])]
    body += ["<h2>Trials</h2>", _trials_table(study, settings)]
    body += _plots(study, settings, best)
    body += ["<h2>Search</h2>",
             pages.table(["setting", "value"], [["recipe", settings.base.get("name", "")], ["space", settings.space["source"]],
                                                ["sampler", settings.sampler], ["pruner", settings.pruner],
                                                ["metric", f"{settings.metric} ({settings.direction})"],
                                                ["budget", settings.trials], ["storage", safe_url(settings.storage)]]),
             pages.table(["key", "range"], [[p.key, p.describe()] for p in settings.space_obj.params]),
             f"<p class=note>Live dashboard: <code>{pages.esc(dashboard_command(settings.storage))}</code></p>"]
    path = Path(settings.runs_dir) / "report.html"
    path.write_text(pages.page(f"Study {settings.study}", f"{counts['ended']} of {settings.trials} trials, "
                                                         f"{time.strftime('%Y-%m-%d %H:%M')}", body))
    return path


def _trials_table(study: optuna.Study, settings: TuneSettings) -> str:
    keys = settings.space_obj.keys
    rows, classes = [], []
    for t in ranked(study, settings):
        rows.append([t.number, state_name(t), _fmt(t.value), t.user_attrs.get("epochs", ""), _duration(t),
                     *(_param(t.params[k]) if k in t.params else "-" for k in keys),
                     t.user_attrs.get("error", "")[:160]])
        classes.append({"complete": "", "pruned": "warn", "failed": "bad"}.get(state_name(t), ""))
    return pages.table(["trial", "state", settings.metric, "epochs", "time", *keys, "error"], rows, classes, left=2)


def _plots(study: optuna.Study, settings: TuneSettings, best: FrozenTrial | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws through pyplot; no display here
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    plots = [("Optimisation history", "the value of every trial and the best so far",
              lambda: ovm.plot_optimization_history(study)),
             ("Learning curves", f"{settings.metric} after each epoch of every trial; pruned trials end early",
              lambda: ovm.plot_intermediate_values(study)),
             ("Parameter importances", "fANOVA: the share of the value's variance each parameter explains",
              lambda: ovm.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))),
             ("Parallel coordinates", "each line a complete trial, coloured by its value",
              lambda: ovm.plot_parallel_coordinate(study)),
             ("Slices", "the value against each parameter", lambda: ovm.plot_slice(study))]
    out = []
    for title, note, draw in plots:
        out.append(f"<h2>{pages.esc(title)}</h2><p class=note>{pages.esc(note)}</p>")
        try:
            # Optuna sets a pyplot style globally: keep it to these figures
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore", ExperimentalWarning)
                out.append(_draw(draw, title))
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            out.append(f"<p class=note>not drawn: {pages.esc(err)}</p>")
    if best is not None:
        out += ["<h2>The best trial's curves</h2>", _curves(best)]
    return out


def _draw(draw, title: str) -> str:
    from matplotlib import pyplot as plt

    fig = np.ravel(draw())[0].figure
    try:
        if not any(ax.has_data() for ax in fig.axes):
            return "<p class=note>not drawn: not enough trials with values yet</p>"
        width, height = fig.get_size_inches()
        fig.set_size_inches(max(width, 8), max(height, 4))
        return pages.img(pages.figure_png(fig), title)
    finally:
        plt.close(fig)


def _curves(best: FrozenTrial) -> str:
    """Loss and metric per epoch of the best trial, from its run folder's metrics.csv."""
    path = Path(best.user_attrs.get("run_dir", "")) / "metrics.csv"
    if not path.is_file():
        return f"<p class=note>{pages.esc(path)} is not on this machine</p>"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    metrics = sorted({k.split("_", 1)[1] for k in rows[0] if k.startswith(("train_", "val_"))}, key=lambda m: m != "loss")
    fig = Figure(figsize=(5 * len(metrics), 3.4))
    for ax, m in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for split, style in (("train", "-"), ("val", "-o")):
            values = [float(r[f"{split}_{m}"]) for r in rows]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(m)
        ax.legend()
        ax.grid(alpha=0.3)
    return pages.img(pages.figure_png(fig), f"trial {best.number}: training curves")


def report(study: optuna.Study, settings: TuneSettings, console: Console) -> Path:
    """Write best.yaml and report.html; print the top trials and the dashboard command."""
    console.print(top_table(study, settings))
    best_yaml = write_best_yaml(study, settings)
    if best_yaml is not None:
        console.print(f"best recipe: {best_yaml}  (cvrecipe run {best_yaml})", highlight=False)
    else:
        console.print("[yellow]no trial completed yet: no best.yaml")
    path = write_report(study, settings)
    console.print(f"report: {path}", highlight=False)
    console.print(f"live dashboard: {dashboard_command(settings.storage)}  (pip install optuna-dashboard)",
                  highlight=False)
    return path
