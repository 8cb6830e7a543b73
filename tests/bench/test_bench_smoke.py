"""Every bench/ script runs at its smallest size (a few steps, tiny data, the CPU), as a real
process, so that a change to the API a benchmark uses breaks a test rather than the benchmark a
month later. The figures these runs print mean nothing; that the scripts finish, and print their
result lines, is what is checked."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA, make_image_folder

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
MEMBRANE = SHARED_DATA / "isbi2012-membrane.tar.gz"

pytestmark = pytest.mark.slow  # each one starts fresh interpreters, servers or trainings


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A module-wide folder: a tiny image folder (3 classes of 32x32 patterns, 40 train and 10 test
    images each), a digits run exported to ONNX with its monitoring profile, and a shared cache."""
    from cvrecipe.config import load_config
    from cvrecipe.export import export_run
    from cvrecipe.monitor.profile import profile_run
    from cvrecipe.train.job import train

    root = tmp_path_factory.mktemp("bench")
    make_image_folder(root / "images", per_class={"train": 40, "test": 10}, size=32)
    cfg = load_config("digits-quick", [f"runs_dir={root / 'runs'}", "name=digits", "train.epochs=1",
                                       "train.sanity=false", f"data.cache_dir={root / 'cache'}"])
    run = train(cfg)
    export_run(run, "onnx", dynamic_batch=True)
    profile_run(run, max_images=100)  # digits' test split has 360 images: the rest are replayed as traffic
    return root


def bench(work: Path, tmp_path: Path, script: str, *args: str, timeout: float = 600) -> str:
    """Run bench/SCRIPT ARGS from an empty folder; its output (stdout and stderr) once it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVRECIPE_CACHE": str(work / "cache")}
    out = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"bench/{script} exited {out.returncode}:\n{text[-4000:]}"
    return text


TINY_SPEEDRUN = ["model.kwargs.widths=[8,16,16]", "train.batch_size=32", "train.epochs=1", "train.device=cpu"]


# scripts whose smoke test sits beside the feature's own tests, reusing their fixtures: script → (file, test)
ELSEWHERE = {"audit": ("tests/data/test_embedding_audit.py", "test_bench_scores_an_audit_against_public_style_lists"),
             "video": ("tests/evaluate/test_predict_video.py", "test_bench_video_prints_frames_per_second")}


def test_every_script_has_a_smoke_test():
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    root = BENCH.parent
    tested |= {script for script, (path, test) in ELSEWHERE.items()
               if f"def {test}(" in (root / path).read_text()}
    scripts = {p.stem.replace("_", "-") for p in BENCH.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts - tested == set(), f"bench scripts without a smoke test: {sorted(scripts - tested)}"


def test_speedrun(work, tmp_path):
    out = bench(work, tmp_path, "speedrun.py", "--runs", "1", "--reference-steps", "2", "--warmup-images", "32",
                "--phases", f"data.name=folder:{work / 'images'}", *TINY_SPEEDRUN)
    assert "test accuracy" in out and "data path (gather + augment)" in out and "where fit() spends" in out


def test_gpu(work, tmp_path):
    """A CUDA machine's script (bench/speedrun.py on the CIFAR-10 recipes, on a GPU): its syntax here."""
    out = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_seeds(work, tmp_path):
    out = bench(work, tmp_path, "seeds.py", "digits-quick", "train.epochs=1", "train.sanity=false", "--seeds", "0",
                "--runs-dir", tmp_path / "runs")
    assert "test accuracy" in out and "seed 0: accuracy" in out


def test_fashion(work, tmp_path):
    out = bench(work, tmp_path, "fashion.py", f"data.name=folder:{work / 'images'}", *TINY_SPEEDRUN,
                "train.sanity=false", "--seeds", "0", "--runs-dir", tmp_path / "runs")
    assert "fashion-mnist-best" in out and "seed 0: accuracy" in out


def test_ingest(work, tmp_path):
    out = bench(work, tmp_path, "ingest.py", "--data", f"folder:{work / 'images'}", "--repeats", "1")
    assert "images: 150" in out and "cached reload" in out


def test_ddp(work, tmp_path):
    out = bench(work, tmp_path, "ddp.py", "--recipe", "digits-quick", "--subset", "200", "--epochs", "1",
                "--rounds", "1", "--variants", "1 process", "2 processes", "--set", "train.batch_size=64")
    assert "2 processes" in out and "img/s" in out


def test_tune(work, tmp_path):
    out = bench(work, tmp_path, "tune.py", "--data", f"folder:{work / 'images'}", "--subset", "60", "--epochs", "1",
                "--trials", "2", "--seeds", "0", "--parts", "search",
                "--runs-dir", tmp_path / "runs", "--out", tmp_path / "results.json")
    assert "TPE+pruning used" in out and (tmp_path / "results.json").is_file()


def test_finetune(work, tmp_path):
    out = bench(work, tmp_path, "finetune.py", "--data", f"folder:{work / 'images'}", "--sizes", "2", "--seeds", "0",
                "--max-epochs", "2", "--predictions", "0", "--json", tmp_path / "finetune.json")
    assert all(method in out for method in ("scratch", "linear", "two-stage")) and (tmp_path / "finetune.json").is_file()


@pytest.mark.skipif(not MEMBRANE.is_file(), reason=f"needs the ISBI 2012 membrane archive ({MEMBRANE})")
def test_membrane(work, tmp_path):
    out = bench(work, tmp_path, "membrane.py", "--folds", "0", "--set", "train.epochs=1", "train.repeat=1",
                "data.image_size=64", "augment.crop_size=32", "model.kwargs={depth: 2, width: 4, norm: batch}",
                "--no-peer")  # the MONAI peer trains and infers at full size: minutes, not a smoke test
    assert "fold 0 cvrecipe: pixel error" in out


def test_stream(work, tmp_path):
    out = bench(work, tmp_path, "stream.py", "--gb", "0.01", "--budget-gb", "0.004", "--steps", "2", "--batch", "16",
                "--rounds", "1", "--dir", tmp_path / "stream", "--set", "model.kwargs.widths=[8,16,16]",
                "train.precision=fp32")
    assert "streamed / in-memory images/s" in out


def test_drift(work, tmp_path):
    out = bench(work, tmp_path, "drift.py", "--run", work / "runs" / "digits", "--window", "20", "--clean-windows",
                "1", "--step", "10", "--rounds", "1", "--requests", "20", "--seconds", "0.5")
    assert "false alarms" in out and "throughput at concurrency 32" in out


def test_monitor_cost(work, tmp_path):
    out = bench(work, tmp_path, "monitor_cost.py", "--run", work / "runs" / "digits", "--batches", "3", "--batch", "4")
    assert "SQLite log" in out and "µs/image" in out


def test_serve(work, tmp_path):
    out = bench(work, tmp_path, "serve.py", "--run", work / "runs" / "digits", "--rounds", "1", "--requests", "20",
                "--seconds", "1", "--concurrency", "2", "--raw-seconds", "0.05")
    assert "cvrecipe's best" in out and "LitServe" in out


def test_serve_detect(work, tmp_path):
    """--detect: trains a tiny detector itself and loads POST /v1/detect (cvrecipe alone: no peer serves boxes)."""
    out = bench(work, tmp_path, "serve.py", "--detect", "--detect-size", "64", "--detect-images", "8", "--rounds", "1", "--requests", "10",
                "--seconds", "1", "--concurrency", "2", "--raw-seconds", "0.05")
    assert "POST /v1/detect" in out and "cvrecipe's best" in out and "LitServe" not in out
    row = next(line for line in out.splitlines() if line.strip().startswith("2 |"))
    assert int(row.split()[-1]) == 0, row  # no request failed


def test_litserve_peer(work, tmp_path):
    """The peer server bench/serve.py measures against: it starts and answers a prediction."""
    pytest.importorskip("litserve")
    from PIL import Image

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(BENCH / "litserve_peer.py"), str(work / "runs" / "digits" / "export"),
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # only catches a hang
        while not _answers(url + "/health"):
            assert proc.poll() is None, f"litserve_peer.py exited:\n{proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "litserve_peer.py not ready after 180 s"
            time.sleep(0.2)
        buf = io.BytesIO()
        Image.new("L", (8, 8), 128).save(buf, format="PNG")
        reply = httpx.post(url + "/predict", files={"file": ("x.png", buf.getvalue(), "image/png")}, timeout=60)
        assert reply.status_code == 200, reply.text
        probs = [t["probability"] for t in reply.json()["top"]]  # the 5 likeliest of digits' 10 classes
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0.5 <= sum(probs) <= 1 + 1e-6
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_fuzz(work, tmp_path):
    out = bench(work, tmp_path, "fuzz.py", "--cases", "20", "--api-cases", "500")  # enough to reach every route
    assert out.count("all passed") == 5


def test_reliability(work, tmp_path):
    out = bench(work, tmp_path, "reliability.py", "--requests", "20", "--concurrency", "4", "--photos", "2",
                "--photo-side", "1000", "--in-flight", "4")
    assert "SIGTERM with 4 requests sent" in out and "mixed requests" in out


def test_soak(work, tmp_path):
    out = bench(work, tmp_path, "soak.py", "--minutes", "0.1", "--concurrency", "2", "--every", "2")
    assert "answered" in out and "server RSS" in out


def _load_bench(name: str):
    """bench/NAME.py as a module, for its helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the smallest synthetic set bench/detect.py makes itself: digits on digits (offline), every class in train
TINY_DETECT = ["--train", "40", "--test", "4", "--size", "64-64", "--image-size", "64", "--objects", "digits",
               "--backgrounds", "digits"]


def test_detect(tmp_path):
    """cvrecipe's side only (Ultralytics is no dependency): the set made, a detector trained for 2.4 CPU
    seconds, its test detections written as COCO results and scored by pycocotools."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVRECIPE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(BENCH / "detect.py"), "--data", "set", "--out", "out", "--budgets", "0.02",
                          "--seeds", "0", "1", *TINY_DETECT, "--models", "fcos-lite0-scratch",
                          "--set", "model.kwargs={fpn_channels: 64}", "train.batch_size=8", "train.num_threads=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "cvrecipe fcos-lite0-scratch: mAP@[.5:.95]" in text and "Ultralytics: skipped" in text
    truth = json.loads((tmp_path / "set" / "annotations" / "instances_test.json").read_text())
    for seed in (0, 1):
        results = json.loads((tmp_path / "out" / f"fcos-lite0-scratch-0.02min-seed{seed}.results.json").read_text())
        assert {r["image_id"] for r in results} <= {image["id"] for image in truth["images"]}
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    # --combine reads the summaries back: one row per seed, then their mean ± sample std
    combined = subprocess.run([sys.executable, str(BENCH / "detect.py"), "--combine", "out"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert combined.returncode == 0, combined.stderr[-2000:]
    mean = sum(r["map"] for r in rows) / 2
    std = abs(rows[0]["map"] - rows[1]["map"]) / 2 ** 0.5  # the sample std of two values
    assert f"| 0.02 min | cvrecipe | fcos-lite0-scratch | 0, 1 | {mean:.4f} ± {std:.4f} |" in combined.stdout


def test_detect_maps_cached_boxes_back_to_the_coco_file(tmp_path, monkeypatch):
    """The test split's own boxes, as cvrecipe holds them (resized to 48 px), given as detections: back
    in each image's pixels and with COCO's category ids they score mAP 1 against instances_test.json."""
    from cvrecipe.cli import main as cli
    from cvrecipe.data.box_source import load_boxes

    monkeypatch.chdir(tmp_path)
    assert cli(["data", "synth-detect", "set", "--train", "40", "--test", "6", "--size", "40-90", "--objects",
                "digits", "--backgrounds", "digits"]) == 0
    detect = _load_bench("detect")
    truth = json.loads(Path("set/annotations/instances_test.json").read_text())
    test = load_boxes(Path("set"), 48, 3, tmp_path / "cache").test
    rows = np.zeros((len(test.y), 10, 6), np.float32)
    rows[..., 5] = -1  # padding
    for i in range(len(test.y)):
        boxes, labels = test.y.boxes_of(i)
        rows[i, :len(labels), :4], rows[i, :len(labels), 4], rows[i, :len(labels), 5] = boxes, 1.0, labels
    meta = {"class_names": [c["name"] for c in truth["categories"]], "input_size": [48, 48]}
    results = detect.coco_results(rows, meta, truth, test.y)
    assert len(results) == len(truth["annotations"])
    assert detect.coco_score(truth, results)["map"] > 0.99
    results[0]["category_id"] = results[0]["category_id"] % 10 + 1  # one box given the wrong class scores less
    assert detect.coco_score(truth, results)["map"] < 0.99


@pytest.mark.skipif(not MEMBRANE.is_file(), reason=f"needs the ISBI 2012 membrane archive ({MEMBRANE})")
def test_detect_real(tmp_path):  # the ISBI cells: the real set that ships beside the checkout
    """The ISBI cells written as a detection set and handed to bench/detect.py: cvrecipe's side only, a
    detector at 64 px trained for 2.4 CPU seconds and scored by pycocotools on the 24 test tiles."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVRECIPE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(BENCH / "detect_real.py"), "--real", "cells", "--masks", str(MEMBRANE),
                          "--data", "cells", "--out", "out", "--budgets", "0.02", "--image-size", "64", "--models",
                          "fcos-lite0-scratch", "--set", "model.kwargs={fpn_channels: 64}", "train.num_threads=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "cells written to cells: train 96 images 3128 boxes, test 24 images 792 boxes" in text
    assert "test split: 24 images, 792 boxes, 1 classes" in text
    assert "cvrecipe fcos-lite0-scratch: mAP@[.5:.95]" in text and "Ultralytics: skipped" in text
    results = json.loads((tmp_path / "out" / "fcos-lite0-scratch-0.02min-seed0.results.json").read_text())
    assert results and {r["category_id"] for r in results} == {1}
    # the small-set batch (SMALL_SET_OVERRIDES) reached the run, the test's own --set after it
    config = yaml.safe_load((tmp_path / "out" / "runs" / "fcos-lite0-scratch-0.02min-seed0" / "config.yaml").read_text())
    assert config["train"]["batch_size"] == 8 and config["train"]["num_threads"] == 1
