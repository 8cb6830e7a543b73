"""Benchmark `cvrecipe tune` on Fashion-MNIST: pruned TPE against random search, the tuned recipe
retrained on the full training set against the shipped one, and 2 workers against 1.

    flock /tmp/cvrecipe-bench.lock python bench/tune.py [--subset 6000 --epochs 4 --trials 24 --seeds 0 1 2]

About 70 minutes on 2 idle CPU cores: trials see a 6,000-image stratified subset (3,000 validation
images) for 4 epochs, so the shipped space's batch sizes (128-512) are replaced by 32/64/128 (bench
space written next to the results); everything else is cvrecipe/recipes/spaces/fashion-mnist-cnn.yaml.

1. Search: for each study seed, `cvrecipe tune fashion-mnist-cnn --space SPACE`
   with TPE + median pruning and with random sampling without pruning (alternating which goes
   first), on a stratified training subset for short trials. Per study: best validation accuracy,
   epochs trained over all trials, wall time; and for TPE, the epochs it spent until its best
   reached random search's mean best minus one std (its spread over seeds).
2. Retrain: the best TPE trial's recipe (best.yaml of the best study) and the shipped
   `fashion-mnist-cnn` recipe, each on the full training set for the same --retrain-epochs, seeds
   0 1 2; test accuracy (`cvrecipe run`) and wall time per run.
3. Workers: the same random, unpruned budget (--worker-trials) with --workers 2 and --workers 1.

Parts run in the order search, workers, retrain; the JSON is rewritten after each.

Everything runs through the command line in subprocesses, as a user would; figures are printed
and written to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvrecipe.config import SPACES_DIR  # noqa: E402


def cli(*args: str) -> float:
    """Run `cvrecipe ARGS` (quietly); returns the wall time in seconds."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cvrecipe", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(f"cvrecipe {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def study_figures(storage: str, name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    epochs, curve = 0, []  # curve: (epochs spent so far, best value so far) after each ended trial
    best = -1.0
    for t in trials:
        epochs += int(t.user_attrs.get("epochs", 0))
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = max(best, t.value)
        curve.append((epochs, best))
    states = [t.state.name for t in trials]
    return {"best": study.best_value, "epochs": epochs, "curve": curve, "trials": len(trials),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL")}


def bench_space(runs: Path) -> Path:
    """The shipped fashion-mnist-cnn space with batch sizes that give a 1,000-image subset enough steps."""
    import yaml

    space = yaml.safe_load((SPACES_DIR / "fashion-mnist-cnn.yaml").read_text())
    space["train.batch_size"] = {"choice": [32, 64, 128]}
    path = runs / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def search(args, runs: Path) -> dict:
    results: dict = {"tpe": [], "random": []}
    methods = {"tpe": ["--sampler", "tpe", "--pruner", "median"], "random": ["--sampler", "random", "--pruner", "none"]}
    for i, seed in enumerate(args.seeds):
        order = ["tpe", "random"] if i % 2 == 0 else ["random", "tpe"]  # alternate: the machine is shared
        for method in order:
            name = f"{method}-s{seed}"
            storage = f"sqlite:///{(runs / name / 'study.db').resolve()}"
            wall = cli("tune", "fashion-mnist-cnn", "--space", str(args.space), f"data.name={args.data}",
                       "--trials", str(args.trials), "--study", name, "--seed", str(seed), *methods[method],
                       f"data.subset={args.subset}", f"data.val_fraction={args.val_fraction}",
                       f"train.epochs={args.epochs}", f"runs_dir={runs}")
            fig = {"seed": seed, "wall_s": round(wall, 1), **study_figures(storage, name)}
            results[method].append(fig)
            print(f"{method:6s} seed {seed}: best val acc {fig['best']:.4f}  epochs {fig['epochs']:3d}  "
                  f"pruned {fig['pruned']:2d}  failed {fig['failed']}  wall {wall / 60:.1f} min", flush=True)
    return results


def summarise_search(results: dict, args) -> dict:
    out = {}
    for method, runs in results.items():
        bests = [r["best"] for r in runs]
        out[method] = {"best_mean": statistics.mean(bests), "best_std": statistics.stdev(bests) if len(bests) > 1 else 0,
                       "epochs_mean": statistics.mean(r["epochs"] for r in runs),
                       "wall_min_mean": statistics.mean(r["wall_s"] for r in runs) / 60}
    target = out["random"]["best_mean"] - out["random"]["best_std"]
    reached = []
    for r in results["tpe"]:
        spent = next((e for e, b in r["curve"] if b >= target), None)
        reached.append(spent)
    out["target"] = target
    out["tpe_epochs_to_reach_random"] = reached
    out["epoch_ratio"] = out["tpe"]["epochs_mean"] / out["random"]["epochs_mean"]
    random_epochs = args.trials * args.epochs
    print(f"\nsearch ({args.trials} trials, {args.epochs} epochs, {args.subset} training images, seeds {args.seeds}):")
    for method in ("tpe", "random"):
        o = out[method]
        print(f"  {method:6s}: best val acc {o['best_mean'] * 100:.2f} ± {o['best_std'] * 100:.2f} %  "
              f"epochs {o['epochs_mean']:.1f}  wall {o['wall_min_mean']:.1f} min per study")
    print(f"  TPE+pruning used {out['epoch_ratio'] * 100:.0f} % of random search's epochs; it reached random's mean "
          f"best - 1 std ({target * 100:.2f} %) after {reached} epochs (random spends {random_epochs})")
    return out


def retrain(args, runs: Path, results: dict) -> dict:
    best = max(results["tpe"], key=lambda r: r["best"])
    best_yaml = runs / f"tpe-s{best['seed']}" / "best.yaml"
    recipes = {"tuned": str(best_yaml), "shipped": "fashion-mnist-cnn"}
    out: dict = {"best_yaml": str(best_yaml), "tuned": [], "shipped": []}
    for seed in args.seeds:
        for which in (("tuned", "shipped") if seed % 2 == 0 else ("shipped", "tuned")):
            name = f"retrain-{which}-s{seed}"
            # the full training set: no subset, the shipped recipe's 10 % validation split
            wall = cli("run", recipes[which], "--no-sanity", f"data.name={args.data}", "data.subset=null",
                       "data.val_fraction=0.1",
                       f"train.epochs={args.retrain_epochs}", f"train.seed={seed}", f"name={name}", f"runs_dir={runs}")
            acc = json.loads((runs / name / "eval.json").read_text())["accuracy"]
            out[which].append({"seed": seed, "test_acc": acc, "wall_s": round(wall, 1)})
            print(f"retrain {which:7s} seed {seed}: test acc {acc:.4f}  wall {wall / 60:.1f} min", flush=True)
    for which in ("tuned", "shipped"):
        accs = [r["test_acc"] for r in out[which]]
        out[f"{which}_mean"], out[f"{which}_std"] = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0
        out[f"{which}_wall_min"] = statistics.mean(r["wall_s"] for r in out[which]) / 60
        print(f"  {which:7s}: test acc {out[f'{which}_mean'] * 100:.2f} ± {out[f'{which}_std'] * 100:.2f} % "
              f"({args.retrain_epochs} epochs, full training set), {out[f'{which}_wall_min']:.1f} min per run")
    return out


def workers(args, runs: Path) -> dict:
    out = {}
    for k in (2, 1):
        name = f"workers{k}"
        wall = cli("tune", "fashion-mnist-cnn", "--space", str(args.space), f"data.name={args.data}",
                   "--trials", str(args.worker_trials), "--study", name, "--sampler", "random", "--pruner", "none",
                   "--workers", str(k), f"data.subset={args.subset}", f"data.val_fraction={args.val_fraction}",
                   f"train.epochs={args.epochs}", f"runs_dir={runs}")
        out[k] = round(wall, 1)
        print(f"--workers {k}: {args.worker_trials} trials in {wall / 60:.1f} min", flush=True)
    print(f"  --workers 2 / --workers 1 wall time: {out[2] / out[1]:.2f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="data.name of every run (default fashion-mnist)")
    p.add_argument("--subset", type=int, default=6000, help="training images per trial (default 6000)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="validation share of the 60,000 (default 0.05)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per trial (default 4)")
    p.add_argument("--trials", type=int, default=24, help="trials per study (default 24)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="study seeds (default 0 1 2)")
    p.add_argument("--retrain-epochs", type=int, default=2, help="epochs of each full-set retraining (default 2)")
    p.add_argument("--worker-trials", type=int, default=4, help="trials of the workers comparison (default 4)")
    p.add_argument("--parts", nargs="+", default=["search", "workers", "retrain"])
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-tune"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-tune/results.json"))
    args = p.parse_args()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.space = bench_space(args.runs_dir)
    t0 = time.perf_counter()
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    if "search" in args.parts:
        report["search"] = search(args, args.runs_dir)
        report["search_summary"] = summarise_search(report["search"], args)
        args.out.write_text(json.dumps(report, indent=1))
    if "workers" in args.parts:
        report["workers"] = workers(args, args.runs_dir)
        args.out.write_text(json.dumps(report, indent=1))
    if "retrain" in args.parts:
        report["retrain"] = retrain(args, args.runs_dir, report["search"])
    report["total_min"] = (time.perf_counter() - t0) / 60
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\ntotal {report['total_min']:.1f} min; figures in {args.out}")


if __name__ == "__main__":
    main()
