"""Detection on real annotated images: cvrecipe's detectors against Ultralytics YOLO from scratch, on
the ISBI 2012 cells or DeepForest's trees, for the same CPU-time budget and scored by the same
pycocotools call (bench/detect.py does the training and scoring; this script makes the set).

    python bench/detect_real.py --real cells --yolo-python ULTRA_VENV/bin/python
    python bench/detect_real.py --real trees --deepforest DF/deepforest/data --yolo-python ULTRA_VENV/bin/python
    python bench/detect_real.py --real cells --budgets 0.02 --models fcos-lite0-scratch --image-size 64 \\
        --set 'model.kwargs={fpn_channels: 64}'   # a smoke run

The sets (written once into --data, reused when it already holds one):
- cells: `cvrecipe data cells` (data/cells.py) on ../shared/data/isbi2012-membrane.tar.gz: one box per
  4-connected component of the non-membrane pixels (at least 20 px, clipped at tile edges), class
  cell, in 256 px tiles (4 per image); images 24-29 are the test split (24 tiles), 0-23 train (96).
- trees: DeepForest's four annotated aerial images (the `deepforest` wheel's data folder, given by
  --deepforest; its Pascal VOC XML read by cvrecipe's boxes:PATH reader), classes Alive, Dead and
  Tree merged into tree, cut into 400 px tiles (data/tiles.py: black padding at the right and bottom
  edges, a box kept where half its area is in the tile); a seeded quarter of each image's tiles
  (seed 0) is the test split. The two 400 px images are one tile each and so train only.

cvrecipe trains these small sets at batch 8 (SMALL_SET_OVERRIDES, before --set): at the recipe's 32,
86 training tiles make 3 optimizer steps per epoch, a few dozen in the budget, too few for a
detector to learn (cells: mAP@[.5:.95] 0.018 at batch 32, 0.19 at 8; docs/results.md).
Ultralytics keeps its defaults (batch 16).

Everything else (the budget rule, both tools' settings, the scoring) is bench/detect.py's; its
options after `--` are passed on (e.g. `-- --yolo-threads 2`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL_SET_OVERRIDES = ["train.batch_size=8"]  # module docstring: enough optimizer steps on ~40-90 images
sys.path.insert(0, str(ROOT))  # this checkout's cvrecipe, run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", choices=["cells", "trees"], required=True, help="which real set")
    parser.add_argument("--deepforest", type=Path, help="trees: the folder of the deepforest wheel's data files")
    parser.add_argument("--masks", type=Path, help="cells: the ISBI 2012 membranes (default ../shared/data)")
    parser.add_argument("--data", type=Path, help="the set's folder (default data/real-cells or data/real-trees)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2], help="training budgets, minutes on --cores")
    parser.add_argument("--cores", type=int, default=2, help="a minute of budget is this many CPU minutes")
    parser.add_argument("--models", nargs="*", default=["fcos-lite0", "fcos-lite0-scratch"], help="cvrecipe detectors")
    parser.add_argument("--yolo", nargs="*", default=["yolo11n.yaml"], help="Ultralytics models (from scratch)")
    parser.add_argument("--yolo-python", help="a Python with ultralytics installed; without it YOLO is skipped")
    parser.add_argument("--image-size", type=int, default=256, help="training and test input side, both tools")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="training seeds, both tools (with several: mean ± std)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"cvrecipe recipe overrides, after {' '.join(SMALL_SET_OVERRIDES)}")
    parser.add_argument("--out", type=Path, help="runs and results (default runs/bench-detect-real/<set>)")
    args, passed = parser.parse_known_args()
    data = args.data or ROOT / "data" / f"real-{args.real}"
    make_set(args, data)
    cmd = [sys.executable, str(ROOT / "bench" / "detect.py"), "--data", str(data), "--budgets",
           *map(str, args.budgets), "--cores", str(args.cores), "--models", *args.models,
           "--image-size", str(args.image_size), "--seeds", *map(str, args.seeds),
           "--out", str(args.out or Path("runs") / "bench-detect-real" / args.real), "--yolo", *args.yolo,
           *(["--yolo-python", args.yolo_python] if args.yolo_python else []),
           "--set", *SMALL_SET_OVERRIDES, *args.set, *[p for p in passed if p != "--"]]
    print("run: " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.exit(subprocess.run(cmd, env=env).returncode)


def make_set(args, data: Path) -> None:
    """Write the set into `data` unless it already holds one (module docstring)."""
    if (data / "data.yaml").is_file() and (data / "annotations" / "instances_test.json").is_file():
        print(f"data: reusing {data}")
        return
    if args.real == "cells":
        from cvrecipe.data.cells import MASKS, cells_set

        counts = cells_set(data, args.masks or MASKS)
    else:
        if args.deepforest is None:
            raise SystemExit("--real trees needs --deepforest DIR: the deepforest wheel's data folder "
                             "(pip download deepforest --no-deps; unzip; DIR = deepforest/data)")
        from cvrecipe.data.tiles import tile_set

        counts = tile_set(args.deepforest, data, tile=400, test_fraction=0.25, seed=0, one_class="tree", fmt="voc")
    print(f"data: {args.real} written to {data}: " + ", ".join(f"{s} {n} images {b} boxes"
                                                               for s, (n, b) in counts.items()))


if __name__ == "__main__":
    main()
