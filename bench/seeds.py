"""Train and evaluate a recipe over several seeds; print test accuracy mean ± std and wall time.

    python bench/seeds.py fashion-mnist --seeds 0 1 2 [key=value ...]

Each seed is a full `cvrecipe run` (sanity checks → train → evaluate the best checkpoint on the
held-out split → report) started as its own command, as a user starts it, in its own run folder
under --runs-dir. Wall time is the whole command's: the interpreter and imports included.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--runs-dir", default="runs/bench", help="parent folder for the runs")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        name = f"{Path(args.recipe).stem}-seed{seed}"
        cmd = [sys.executable, "-m", "cvrecipe", "run", args.recipe, *args.overrides, f"train.seed={seed}",
               f"runs_dir={args.runs_dir}", f"name={name}"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if out.returncode != 0:
            sys.exit(f"seed {seed}: `{' '.join(cmd)}` failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        run_dir = _run_folder(out.stdout, Path(args.runs_dir) / name)
        accuracy = json.loads((run_dir / "eval.json").read_text())["accuracy"]
        results.append((seed, accuracy, seconds))
        print(f"seed {seed}: accuracy {accuracy:.4f}  wall {seconds / 60:.2f} min  ({run_dir})", flush=True)
    accs = [a for _, a, _ in results]
    walls = [s / 60 for _, _, s in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\n{args.recipe} {' '.join(args.overrides)}: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"test accuracy {statistics.mean(accs) * 100:.2f} ± {std * 100:.2f} % (n={len(accs)}, "
          f"seeds {args.seeds}); wall {statistics.mean(walls):.2f} min per run (max {max(walls):.2f})")


def _run_folder(stdout: str, default: Path) -> Path:
    """The folder the command printed ("run folder: PATH"); runs/<name>-2 etc. when <name> was taken."""
    for line in stdout.splitlines():
        if line.startswith("run folder: "):
            return Path(line.removeprefix("run folder: ").strip())
    return default


if __name__ == "__main__":
    main()
