"""Detection: cvrecipe's detectors against Ultralytics YOLO from scratch, on the seeded synthetic set,
each trained for the same CPU-time budget and scored by the same pycocotools call on the same test
images.

    python bench/detect.py --yolo-python ULTRA_VENV/bin/python              # 5 and 15 CPU-minute budgets
    python bench/detect.py --budgets 5 --models fcos-lite0 --yolo yolo11n.yaml --yolo-python ULTRA_VENV/bin/python
    python bench/detect.py --seeds 0 1 2 --yolo-python ULTRA_VENV/bin/python    # mean ± std over 3 seeds
    python bench/detect.py --combine OUT1 OUT2 ...        # one table, mean ± std, from earlier runs' summaries
    python bench/detect.py --budgets 0.05 --train 16 --test 4 --size 64-64 --image-size 64 --objects digits \\
        --backgrounds digits --models fcos-lite0-scratch --set 'model.kwargs={fpn_channels: 64}'   # a smoke run

The set: `cvrecipe data synth-detect DIR` (docs/detection.md; 5,000 train / 500 test images of
128-256 px, 1-6 Fashion-MNIST items on CIFAR-10 photos, seed 0) written once and reused when DIR
already holds it. It is YOLO layout and COCO JSON: cvrecipe reads it as `boxes:DIR` (the YOLO
files; 10 % of train held out as its val split), Ultralytics through DIR/data.yaml.

The budget rule: a budget of M minutes on C cores (--budgets, --cores) is M x 60 x C seconds of CPU
time of the training process: time.process_time, all its threads, so a shared, loaded machine gives
each tool the same work rather than the same wall time (5 minutes on 2 cores = 600 CPU seconds).
Wall time is printed beside it. OpenMP's threads wait passively (OMP_WAIT_POLICY=PASSIVE, set for
both tools unless the environment sets it): by default a thread spins while it waits for the
others, and on an oversubscribed machine that spinning is CPU time without work (the FCOS probe
measured 365 CPU ms per training image with 2 spinning threads on a 2-core machine at load 12,
52 with passive ones, 50 on one thread).
- cvrecipe: the recipe (--recipe, detect-synth: FCOS at 128 px, AdamW, one-cycle) with
  train.budget_s = the budget (the loop stops at the step that spends it) and train.epochs sized
  from a probe of the CPU seconds one training and one validation image cost (a few steps of the
  same model, not counted in the budget), so the schedule ends near the budget.
- Ultralytics: its own time budget (`time=`, which re-plans its epochs and schedule after each
  epoch) counted on the same clock: its trainer's time.time is replaced by time.process_time, and
  workers=0 keeps its data loading in the one process that is measured. Everything else is its
  defaults (imgsz = --image-size; on a CPU it trains on cores - 1 threads unless --yolo-threads).
  It runs under another Python (--yolo-python; Ultralytics is not a cvrecipe dependency), offline:
  YOLO_OFFLINE=1, its settings folder inside the output folder, plots=False (no font download).
  The last.pt weights are scored (its val set is this test split: nothing is selected on it).

Scoring: each tool's detections on the test images, in the images' own pixels, are written as a COCO
results file (bbox x, y, w, h; category_id by class name from annotations/instances_test.json) and
scored against that file by pycocotools' COCOeval: mAP@[.5:.95], mAP@.5, mAP@.75, AR@100.
Ultralytics' own validation figure of the same weights is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synth-detect"
BACKGROUNDS = f"folder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"
PROBE_STEPS = 3  # timed training steps of the probe (after one untimed): ~100 images at batch 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the synthetic set's folder: made when missing")
    parser.add_argument("--train", type=int, default=5000, help="training images, when the set is made")
    parser.add_argument("--test", type=int, default=500, help="test images, when the set is made")
    parser.add_argument("--size", default="128-256", help="image side range, when the set is made")
    parser.add_argument("--data-seed", type=int, default=0, help="the set's seed, when it is made")
    parser.add_argument("--objects", default="fashion-mnist", help="items pasted, when the set is made")
    parser.add_argument("--backgrounds", default=BACKGROUNDS, help="background photos, when the set is made")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5, 15], help="training budgets, minutes on --cores")
    parser.add_argument("--cores", type=int, default=2, help="a minute of budget is this many CPU minutes")
    parser.add_argument("--recipe", default="detect-synth", help="cvrecipe's detection recipe")
    parser.add_argument("--models", nargs="*", default=["fcos-lite0", "fcos-lite0-scratch"], help="cvrecipe detectors")
    parser.add_argument("--image-size", type=int, default=128, help="training and test input side, both tools")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="training seeds, both tools: each budget runs each seed; with several, mean ± std")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="OUT",
                        help="print the tables of earlier runs' OUT/summary.json files together, and stop")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="cvrecipe recipe overrides")
    parser.add_argument("--yolo-python", help="a Python with ultralytics installed; without it YOLO is skipped")
    parser.add_argument("--yolo", nargs="*", default=["yolo11n.yaml", "yolo26n.yaml"], help="Ultralytics models")
    parser.add_argument("--yolo-threads", type=int, help="torch threads for Ultralytics (default: its own, cores - 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-detect"), help="runs, results files, summary")
    parser.add_argument("--yolo-worker", help=argparse.SUPPRESS)  # internal: JSON spec, run under --yolo-python
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (module docstring); inherited
    if args.yolo_worker:
        return yolo_worker(json.loads(args.yolo_worker))

    if args.combine:
        return summary([{**row, "seed": row_seed(row, out)} for out in args.combine
                        for row in json.loads((out / "summary.json").read_text())])
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"host: {platform.node()}  cores: {os.cpu_count()}  python {platform.python_version()}  {versions()}  "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    ensure_data(args)
    truth = json.loads((args.data / "annotations" / "instances_test.json").read_text())
    print(f"test split: {len(truth['images'])} images, {len(truth['annotations'])} boxes, "
          f"{len(truth['categories'])} classes")
    rows = []
    for minutes in args.budgets:
        budget = minutes * 60 * args.cores
        for seed in args.seeds:
            print(f"\n== budget {minutes:g} min on {args.cores} cores = {budget:.0f} CPU seconds, seed {seed} ==")
            for model in args.models:
                rows.append({**run_ours(model, budget, minutes, seed, args, truth), "seed": seed})
            for yolo in args.yolo if args.yolo_python else []:
                rows.append({**run_yolo(yolo, budget, minutes, seed, args, truth), "seed": seed})
            if not args.yolo_python:
                print("Ultralytics: skipped (no --yolo-python)")
    summary(rows)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"summary: {args.out / 'summary.json'}")


def versions() -> str:
    from importlib.metadata import version

    return "  ".join(f"{name} {version(name)}" for name in ("torch", "torchvision", "pycocotools"))


def load() -> str:
    """The load averages over 1, 5 and 15 minutes (what `uptime` prints)."""
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


# ---- the data set ------------------------------------------------------------------------------------

def ensure_data(args) -> None:
    """Write the synthetic set with the seeded command, unless --data already holds one."""
    if (args.data / "data.yaml").is_file() and (args.data / "annotations" / "instances_test.json").is_file():
        print(f"data: reusing {args.data}")
        return
    cmd = [sys.executable, "-m", "cvrecipe", "data", "synth-detect", str(args.data), "--train", str(args.train),
           "--test", str(args.test), "--size", args.size, "--seed", str(args.data_seed), "--objects", args.objects,
           "--backgrounds", args.backgrounds]
    print("data: " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"data: written in {time.perf_counter() - t0:.0f} s")


# ---- scoring -----------------------------------------------------------------------------------------

def coco_score(truth: dict, results: list[dict]) -> dict:
    """pycocotools' box evaluation of COCO `results` against the `truth` dataset dict; the one call
    both tools are scored with (cvrecipe's own, tasks/box_metrics.py cocoeval)."""
    from cvrecipe.tasks.box_metrics import cocoeval

    if not results:  # pycocotools cannot load an empty result list
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "ar100": 0.0}
    evaluation = cocoeval(truth, results)
    s = evaluation.stats
    return {"map": float(s[0]), "map50": float(s[1]), "map75": float(s[2]), "ar100": float(s[8])}


def by_file(truth: dict) -> dict[str, dict]:
    """The test images of instances_test.json by file name (as data.yaml's folders name them)."""
    return {image["file_name"]: image for image in truth["images"]}


def show_first(name: str, truth: dict, results: list[dict]) -> None:
    """The first test image's true boxes and a tool's three best detections there, both as COCO
    [x, y, w, h] in the image's pixels: the class and box-format mapping, checked by eye."""
    first = min(truth["images"], key=lambda image: image["file_name"])
    names = {c["id"]: c["name"] for c in truth["categories"]}
    true = [f"{names[a['category_id']]} {[round(v) for v in a['bbox']]}" for a in truth["annotations"]
            if a["image_id"] == first["id"]]
    found = sorted((r for r in results if r["image_id"] == first["id"]), key=lambda r: -r["score"])[:3]
    print(f"  {first['file_name']} ({first['width']}x{first['height']}) true: {'; '.join(true)}")
    print(f"  {name} best 3: " + "; ".join(f"{names[r['category_id']]} {[round(v) for v in r['bbox']]} "
                                          f"{r['score']:.2f}" for r in found))


# ---- cvrecipe ----------------------------------------------------------------------------------------

def run_ours(model: str, budget: float, minutes: float, seed: int, args, truth: dict) -> dict:
    from cvrecipe.artifact.checkpoint import load_model
    from cvrecipe.artifact.inference import predict_logits
    from cvrecipe.config import load_config
    from cvrecipe.data import load_dataset
    from cvrecipe.train.job import train

    name = f"{model}-{minutes:g}min-seed{seed}"
    cfg = load_config(args.recipe, [f"data.name=boxes:{args.data.resolve()}", f"data.image_size={args.image_size}",
                                    f"model.name={model}", f"runs_dir={args.out / 'runs'}", f"name={name}",
                                    f"train.seed={seed}",
                                    "train.sanity=false",  # the budget is training's; the checks run in `cvrecipe run`
                                    *args.set])
    ds = load_dataset(cfg.data, cfg.train.seed)
    per_train, per_val, probe_cpu = probe(cfg, ds)
    epoch_cpu = per_train * len(ds.train) + per_val * len(ds.val)
    cfg.train.epochs = max(1, round(budget / epoch_cpu))
    cfg.train.budget_s = budget
    print(f"\n-- cvrecipe {model} ({args.recipe}, {args.image_size} px): probe {per_train * 1e3:.0f} CPU ms per "
          f"training image, {per_val * 1e3:.0f} per val image ({probe_cpu:.0f} CPU s, not in the budget) -> "
          f"{cfg.train.epochs} epochs of {len(ds.train)} images; train.budget_s={budget:.0f}")
    print(f"   before: {load()}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run_dir = train(cfg)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"   after:  {load()}")
    epochs_done = sum(1 for _ in open(run_dir / "metrics.csv")) - 1

    net = load_model(run_dir)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows = predict_logits(net, ds.test.x, 64).numpy()  # (N, 100, 6) in the 128 px input frame
    predict_wall = time.perf_counter() - wall0
    results = coco_results(rows, net.meta, truth, ds.test.y)
    (args.out / f"{name}.results.json").write_text(json.dumps(results))
    show_first(model, truth, results)
    score = coco_score(truth, results)
    print(f"   cvrecipe {model}: mAP@[.5:.95] {score['map']:.4f}  mAP@.5 {score['map50']:.4f}  "
          f"mAP@.75 {score['map75']:.4f}  AR@100 {score['ar100']:.4f}  | training {cpu:.0f} CPU s, {wall:.0f} s "
          f"wall, {epochs_done} epochs; predict {predict_wall / len(rows) * 1e3:.1f} ms/image wall")
    return {"tool": "cvrecipe", "model": model, "minutes": minutes, "budget_cpu_s": budget, "train_cpu_s": cpu,
            "train_wall_s": wall, "epochs": epochs_done, **score, "run": str(run_dir)}


def probe(cfg, ds) -> tuple[float, float, float]:
    """CPU seconds per training image (forward, backward, AdamW step) and per validation image (an
    eval-mode forward), measured on a fresh copy of the model: (train, val, the probe's own cost)."""
    import torch

    from cvrecipe.artifact.build import build_model
    from cvrecipe.device import backend_settings
    from cvrecipe.tasks import get_task

    task, b = get_task(cfg.task, cfg), min(cfg.train.batch_size, len(ds.train))
    wrap = len(ds.train) - b + 1  # batch starts wrap round a small training split: every batch full
    start = time.process_time()
    with backend_settings(torch.device("cpu"), False, cfg.train.num_threads):
        model = build_model(cfg, ds).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        for i in range(PROBE_STEPS + 1):
            if i == 1:  # the first step pays for allocation and warm-up
                t0 = time.process_time()
            first = i * b % wrap
            x = torch.from_numpy(ds.train.x[first:first + b]).contiguous(memory_format=torch.channels_last)
            y = task.batch_targets(ds.train.y, first, first + b)
            loss = task.loss(task.forward(model, x, y), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        per_train = (time.process_time() - t0) / (PROBE_STEPS * b)
        model.eval()
        x = torch.from_numpy(ds.train.x[:b]).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            model(x)
            t0 = time.process_time()
            model(x)
        per_val = (time.process_time() - t0) / b
    return per_train, per_val, time.process_time() - start


def coco_results(rows, meta: dict, truth: dict, targets) -> list[dict]:
    """cvrecipe's (N, D, 6) detections on the test split → COCO results in each image's own pixels,
    through the answer layer that `cvrecipe predict` uses (every box: score threshold 0)."""
    from cvrecipe.tasks.answers.detection import answers

    images = sorted(truth["images"], key=lambda image: image["file_name"])  # the reader's order (by file)
    counts = [sum(1 for a in truth["annotations"] if a["image_id"] == image["id"]) for image in images]
    cached = [int(n) for n in targets.offsets[1:] - targets.offsets[:-1]]
    if len(images) != len(rows) or counts != cached:
        raise SystemExit(f"the cached test split ({len(rows)} images) does not line up with instances_test.json "
                         f"({len(images)} images) by file name: boxes per image differ")
    category = {c["name"]: c["id"] for c in truth["categories"]}
    sizes = [(image["height"], image["width"]) for image in images]
    found = answers(rows, meta, k=rows.shape[1], score_threshold=0.0, image_sizes=sizes)
    return [{"image_id": image["id"], "category_id": category[box["class"]], "score": box["score"],
             "bbox": [box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"]]}
            for image, answer in zip(images, found) for box in answer["boxes"]]


# ---- Ultralytics -------------------------------------------------------------------------------------

def run_yolo(model: str, budget: float, minutes: float, seed: int, args, truth: dict) -> dict:
    """Train and predict in a worker under --yolo-python; score its COCO results here."""
    name = f"{Path(model).stem}-{minutes:g}min-seed{seed}"
    out = (args.out / "ultralytics").resolve()
    spec = {"model": model, "name": name, "budget_s": budget, "data": str(args.data.resolve()), "out": str(out),
            "imgsz": args.image_size, "seed": seed, "threads": args.yolo_threads}
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(out / "settings"), "MPLBACKEND": "Agg"}
    print(f"\n-- Ultralytics {model} ({args.image_size} px): time={budget / 3600:.4f} CPU hours")
    print(f"   before: {load()}")
    done = subprocess.run([args.yolo_python, str(Path(__file__).resolve()), "--yolo-worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    print(f"   after:  {load()}")
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"   Ultralytics {model}: failed ({done.returncode}); its output's end:\n{done.stderr[-3000:]}")
        return {"tool": "ultralytics", "model": model, "minutes": minutes, "failed": True}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = json.loads(Path(report["results"]).read_text())
    show_first(model, truth, results)
    score = coco_score(truth, results)
    print(f"   Ultralytics {report['version']} {model}: mAP@[.5:.95] {score['map']:.4f}  mAP@.5 {score['map50']:.4f}  "
          f"mAP@.75 {score['map75']:.4f}  AR@100 {score['ar100']:.4f}  (its own val: {report['own_map']:.4f} / "
          f"{report['own_map50']:.4f})  | training {report['train_cpu_s']:.0f} CPU s, {report['train_wall_s']:.0f} s "
          f"wall, {report['epochs']} epochs on {report['threads']} thread(s); predict "
          f"{report['predict_ms']:.1f} ms/image wall")
    return {"tool": "ultralytics", "model": model, "minutes": minutes, "budget_cpu_s": budget,
            "train_cpu_s": report["train_cpu_s"], "train_wall_s": report["train_wall_s"], "epochs": report["epochs"],
            **score, "own_map": report["own_map"], "own_map50": report["own_map50"], "version": report["version"]}


def yolo_worker(spec: dict) -> None:
    """Under --yolo-python: train spec["model"] from scratch for spec["budget_s"] CPU seconds, write its
    test detections as COCO results, print one JSON line. Imports nothing from cvrecipe."""
    import types

    import torch
    import ultralytics
    from ultralytics import YOLO
    from ultralytics.engine import trainer
    from ultralytics.utils import torch_utils

    if spec["threads"]:  # what its device selection sets torch's thread count to on a CPU
        torch_utils.NUM_THREADS = spec["threads"]
    # its time budget on the CPU clock: the trainer reads time.time() only for `time=` and its logs
    trainer.time = types.SimpleNamespace(time=time.process_time)
    data, out = Path(spec["data"]), Path(spec["out"])
    # the set's data.yaml with its `path: .` made absolute: Ultralytics reads a relative path from the working folder
    yaml_path = out / "data.yaml"
    yaml_path.write_text(f"path: {data}\n" + "".join(line + "\n" for line in (data / "data.yaml").read_text().splitlines()
                                                    if not line.startswith("path:")))
    model = YOLO(spec["model"])  # a .yaml: the architecture with random weights
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model.train(data=yaml_path, time=spec["budget_s"] / 3600, imgsz=spec["imgsz"], device="cpu", workers=0,
                plots=False, val=False, pretrained=False, amp=False, seed=spec["seed"], project=str(out),
                name=spec["name"], exist_ok=True, verbose=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    threads = torch.get_num_threads()
    run = out / spec["name"]
    epochs = sum(1 for _ in open(run / "results.csv")) - 1

    truth = json.loads((data / "annotations" / "instances_test.json").read_text())
    category = {c["name"]: c["id"] for c in truth["categories"]}
    images = {str(data / image["file_name"]): image for image in truth["images"]}
    best = YOLO(str(run / "weights" / "last.pt"))
    names = best.names  # class index → name, from data.yaml
    results, t0 = [], time.perf_counter()
    for found in best.predict(sorted(images), imgsz=spec["imgsz"], conf=0.001, iou=0.7, max_det=100, device="cpu",
                              stream=True, verbose=False, batch=32):
        image = images[found.path]
        for (x1, y1, x2, y2), score, cls in zip(found.boxes.xyxy.tolist(), found.boxes.conf.tolist(),
                                                found.boxes.cls.tolist()):
            results.append({"image_id": image["id"], "category_id": category[names[int(cls)]], "score": score,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    predict_ms = (time.perf_counter() - t0) / len(images) * 1e3
    path = out / f"{spec['name']}.results.json"
    path.write_text(json.dumps(results))
    own = best.val(data=yaml_path, split="test", imgsz=spec["imgsz"], device="cpu", workers=0, plots=False,
                   conf=0.001, iou=0.7, verbose=False, project=str(out), name=spec["name"] + "-val", exist_ok=True)
    print(json.dumps({"results": str(path), "train_cpu_s": cpu, "train_wall_s": wall, "epochs": epochs,
                      "threads": threads, "predict_ms": predict_ms, "own_map": float(own.box.map),
                      "own_map50": float(own.box.map50), "version": ultralytics.__version__}))


# ---- the table ---------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> None:
    """Each run's row; then, per budget, tool and model, the mean ± std (sample) over its seeds and
    the ratio of the best cvrecipe mean to the best Ultralytics mean."""
    print("\n| budget | seed | tool | model | mAP@[.5:.95] | mAP@.5 | mAP@.75 | AR@100 | train CPU s | train wall s | epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['minutes']:g} min | {r.get('seed', '?')} | {r['tool']} | {r['model']} |"
        if r.get("failed"):
            print(f"{head} failed | | | | | | |")
            continue
        print(f"{head} {r['map']:.4f} | {r['map50']:.4f} | {r['map75']:.4f} | {r['ar100']:.4f} | "
              f"{r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} | {r['epochs']} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("failed"):
            groups.setdefault((r["minutes"], r["tool"], r["model"]), []).append(r)
    print("\n| budget | tool | model | seeds | mAP@[.5:.95] | mAP@.5 | AR@100 |")
    print("|---|---|---|---|---|---|---|")
    for (minutes, tool, model), group in sorted(groups.items()):
        seeds = ", ".join(str(r.get("seed", "?")) for r in group)
        print(f"| {minutes:g} min | {tool} | {model} | {seeds} | {spread(group, 'map')} | {spread(group, 'map50')} | "
              f"{spread(group, 'ar100')} |")
    for minutes in sorted({minutes for minutes, _, _ in groups}):
        means = {key: statistics.mean(r["map"] for r in group) for key, group in groups.items() if key[0] == minutes}
        ours = {key: m for key, m in means.items() if key[1] == "cvrecipe"}
        yolo = {key: m for key, m in means.items() if key[1] == "ultralytics"}
        if ours and yolo:
            best, other = max(ours, key=ours.get), max(yolo, key=yolo.get)
            ratio = ours[best] / yolo[other] if yolo[other] else float("inf")
            print(f"{minutes:g} min: cvrecipe {best[2]} / Ultralytics {other[2]}, mean mAP@[.5:.95] "
                  f"{ours[best]:.4f} / {yolo[other]:.4f} = {ratio:.2f}x")


def row_seed(row: dict, out: Path) -> int:
    """A row's training seed; a summary written before rows carried it has it in the run's own
    record: cvrecipe's config.yaml (train.seed), Ultralytics' args.yaml (seed)."""
    import yaml

    if "seed" in row:
        return row["seed"]
    if row["tool"] == "cvrecipe":
        return yaml.safe_load((Path(row["run"]) / "config.yaml").read_text())["train"]["seed"]
    record = out / "ultralytics" / f"{Path(row['model']).stem}-{row['minutes']:g}min" / "args.yaml"
    return yaml.safe_load(record.read_text())["seed"]


def spread(group: list[dict], key: str) -> str:
    """mean ± sample std over the group's runs (the one value when there is one run)."""
    values = [r[key] for r in group]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

if __name__ == "__main__":
    main()
