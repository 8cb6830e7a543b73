"""5-fold cross-validation on the ISBI 2012 membrane set: cvrecipe's `membrane-unet` against a peer.

For each fold (24 training / 6 validation images, folds fixed by data.folds' seed):
  cvrecipe  `membrane-unet` trained by cvrecipe's own train job (sanity checks off), its best
            checkpoint evaluated on the fold's 6 images, whole, in overlapping tiles.
  peer      what a user would write with MONAI: BasicUNet (default features), a plain PyTorch loop,
            MONAI's DiceCELoss, random 256x256 crops and flips, Adam (lr 1e-3), batch 8, trained
            for the same CPU time (this process's, all threads) cvrecipe's training used on that
            fold, then evaluated with MONAI's sliding_window_inference (its defaults) on the same
            6 images. CPU time rather than wall-clock time, so that other jobs on the same cores
            slow both sides alike instead of handing the budget to whichever runs while they pause;
            wall-clock times are printed too.
Both are scored by the same code (cvrecipe.tasks.segmentation.segmentation_metrics): pixel error
(1 - pixel accuracy), membrane Dice, mIoU. Prints one line per fold and model, then mean ± std.

    flock /tmp/cvrecipe-bench.lock python bench/membrane.py                 # all 5 folds
    python bench/membrane.py --folds 0 --set train.epochs=4                 # one short fold
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cvrecipe.config import RECIPES_DIR, load_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.job import evaluate_run
from cvrecipe.tasks.segmentation import segmentation_metrics
from cvrecipe.train.job import train

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "isbi2012-membrane.tar.gz"
FOLDS = 5


def cvrecipe_fold(fold: int, archive: Path, runs: Path, extra: list[str]) -> dict:
    cfg = load_config("membrane-unet", [f"data.name=masks:{archive}", f"data.folds={FOLDS}", f"data.fold={fold}",
                                        f"runs_dir={runs}", f"name=fold{fold}", "train.sanity=false",
                                        "train.num_threads=2", *extra])
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = train(cfg, console=Console(quiet=True))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    result, _ = evaluate_run(run_dir, console=Console(quiet=True))
    return {**_scores(result), "train_s": seconds, "train_cpu_s": cpu_seconds, "run": str(run_dir)}


def _scores(result: dict) -> dict:
    membrane = result["per_class"][0]
    return {"pixel_error": result["pixel_error"], "membrane_dice": membrane["dice"], "miou": result["miou"],
            "pixel_accuracy": result["pixel_accuracy"]}


def peer_fold(fold: int, archive: Path, budget_cpu_s: float, seed: int = 0) -> dict:
    """MONAI BasicUNet + DiceCE + Adam in a plain loop, for `budget_cpu_s` seconds of CPU time."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    cfg = load_config(None, ["task=segmentation", f"data.name=masks:{archive}", f"data.folds={FOLDS}",
                             f"data.fold={fold}", f"data.mask_classes={RECIPES_DIR / 'classes' / 'membrane.yaml'}"])
    ds = load_dataset(cfg.data)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x = torch.from_numpy(ds.train.x).float() / 255  # (24, 1, 512, 512)
    y = torch.from_numpy(ds.train.y).long()[:, None]  # (24, 1, 512, 512): 0 membrane, 1 cell
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    net.train()
    while time.process_time() - c0 < budget_cpu_s:
        idx = torch.randint(0, len(x), (8,), generator=gen)
        top, left = (torch.randint(0, 512 - 256 + 1, (2,), generator=gen)).tolist()
        xb, yb = x[idx, :, top:top + 256, left:left + 256], y[idx, :, top:top + 256, left:left + 256]
        if torch.rand(1, generator=gen) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand(1, generator=gen) < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        loss = loss_fn(net(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(ds.val.x).float() / 255, (256, 256), 4, net)
    result = segmentation_metrics(logits, torch.from_numpy(ds.val.y), ds.classes)
    return {**_scores(result), "train_s": seconds, "train_cpu_s": cpu_seconds, "steps": steps}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="*", default=list(range(FOLDS)))
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--set", nargs="*", default=[], help="overrides for membrane-unet, e.g. train.epochs=4")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive} not found (the ISBI 2012 membrane archive)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fold in args.folds:
            ours = cvrecipe_fold(fold, args.archive, Path(tmp) / "runs", args.set)
            print(f"fold {fold} cvrecipe: pixel error {ours['pixel_error']:.4f}  membrane Dice "
                  f"{ours['membrane_dice']:.4f}  mIoU {ours['miou']:.4f}  train {ours['train_s']:.0f} s "
                  f"({ours['train_cpu_s']:.0f} CPU s)", flush=True)
            row = {"fold": fold, "cvrecipe": ours}
            if not args.no_peer:
                peer = peer_fold(fold, args.archive, ours["train_cpu_s"])
                print(f"fold {fold} peer:     pixel error {peer['pixel_error']:.4f}  membrane Dice "
                      f"{peer['membrane_dice']:.4f}  mIoU {peer['miou']:.4f}  train {peer['train_s']:.0f} s "
                      f"({peer['train_cpu_s']:.0f} CPU s, {peer['steps']} steps)  cvrecipe - peer membrane Dice "
                      f"{ours['membrane_dice'] - peer['membrane_dice']:+.4f}", flush=True)
                row["peer"] = peer
            rows.append(row)
            print(f"fold {fold}: load average (1, 5, 15 min) {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
                  flush=True)
    for who in ("cvrecipe", "peer"):
        if who in rows[0]:
            got = [r[who] for r in rows]
            print(f"{who}: pixel error {_mean_std([g['pixel_error'] for g in got])}, membrane Dice "
                  f"{_mean_std([g['membrane_dice'] for g in got])}, mIoU {_mean_std([g['miou'] for g in got])}, "
                  f"training {_mean_std([g['train_s'] / 60 for g in got])} min per fold "
                  f"({_mean_std([g['train_cpu_s'] / 60 for g in got])} CPU min; n={len(got)} folds)")
    if "peer" in rows[0]:
        gaps = [r["cvrecipe"]["membrane_dice"] - r["peer"]["membrane_dice"] for r in rows]
        print(f"cvrecipe - peer, membrane Dice per fold: {', '.join(f'{g:+.4f}' for g in gaps)} "
              f"(ahead on {sum(g >= 0 for g in gaps)} of {len(gaps)} folds)")
    if args.json:
        args.json.write_text(json.dumps({"folds": rows, "torch": torch.__version__,
                                         "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
