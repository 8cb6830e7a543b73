"""Train and evaluate a recipe over several seeds; print test accuracy mean ± std and wall time.

    python bench/seeds.py fashion-mnist --seeds 0 1 2 [key=value ...]

Each seed is a full `cvrecipe run` (train → evaluate the best checkpoint on the held-out split)
in its own run folder under --runs-dir. Wall time counts data loading, training and evaluation.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console

from cvrecipe.evaluate.job import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--runs-dir", default="runs/bench", help="parent folder for the runs")
    args = parser.parse_args()
    console = Console(soft_wrap=True)
    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run_dir = run(args.recipe, [*args.overrides, f"train.seed={seed}", f"runs_dir={args.runs_dir}",
                                    f"name={args.recipe}-seed{seed}"], console)
        seconds = time.perf_counter() - t0
        accuracy = json.loads((run_dir / "eval.json").read_text())["accuracy"]
        results.append((seed, accuracy, seconds))
        print(f"seed {seed}: accuracy {accuracy:.4f}  wall {seconds / 60:.1f} min  ({run_dir})", flush=True)
    accs = [a for _, a, _ in results]
    walls = [s / 60 for _, _, s in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\n{args.recipe} {' '.join(args.overrides)}: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"test accuracy {statistics.mean(accs) * 100:.2f} ± {std * 100:.2f} % (n={len(accs)}, "
          f"seeds {args.seeds}); wall {statistics.mean(walls):.1f} min per run (max {max(walls):.1f})")


if __name__ == "__main__":
    main()
