"""The jobs after training: evaluate a run, predict on image files, write the report, and `run`
(train, then evaluate and report: the main job). Each reads the run folder the train job wrote."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from cvrecipe.artifact.checkpoint import load_model, read_metadata, save_weights
from cvrecipe.artifact.inference import load_image_batches, predict_logits
from cvrecipe.config import load_config, load_run_config
from cvrecipe.data import load_dataset
from cvrecipe.device import resolve_device
from cvrecipe.evaluate.calibration import halves, held_out_temperature
from cvrecipe.evaluate.leakfree import leak_free_scores
from cvrecipe.imagefile import expand_image_paths, pil_decode, read_header
from cvrecipe.tasks import get_task, task_of
from cvrecipe.train.job import train


def evaluate(run_dir: Path, data: str | None = None, split: str | None = None,
             console: Console | None = None, tta: int | None = None) -> dict:
    """Evaluate the run's best checkpoint on its held-out split (or another dataset); writes eval.json.
    `tta`: the test-time augmentation level (default: the run's eval.tta)."""
    return evaluate_run(run_dir, data, split, console, tta)[0]


def evaluate_run(run_dir: Path, data: str | None = None, split: str | None = None,
                 console: Console | None = None, tta: int | None = None) -> tuple[dict, torch.Tensor]:
    """evaluate(), also returning the outputs it scored, so that the report need not compute them
    again (with TTA 2 that pass is 6 forward passes over the split)."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    tta = cfg.eval.tta if tta is None else tta
    device = resolve_device(cfg.train.device)
    model = load_model(run_dir / "best.safetensors", device)
    meta = model.meta
    task = get_task(task_of(meta), cfg)
    data_cfg = dataclasses.replace(cfg.data, subset=None)
    if data:  # another dataset: bring its images to the model's input shape
        height, width = meta["input_size"]
        data_cfg = dataclasses.replace(data_cfg, name=data, channels=meta["in_channels"],
                                       image_size=height if height == width else None)
    ds = load_dataset(data_cfg, seed=cfg.train.seed)
    split_name, part = (split, getattr(ds, split)) if split else ds.eval_split
    if part is None or len(part) == 0:
        raise ValueError(f"dataset {ds.name} has no {split_name} split to evaluate on")
    if list(ds.classes) != list(meta["class_names"]):
        raise ValueError(f"dataset {ds.name} has classes {ds.classes}, the model was trained on {meta['class_names']}")
    logits = predict_logits(model, part.x, 512, device, channels_last=cfg.train.channels_last, tta=tta,
                            tta_mirror=cfg.augment.hflip and ds.hflip_ok)
    _, extra = read_metadata(run_dir / "best.safetensors")
    result = {"task": task.name, "dataset": ds.name, "split": split_name, "checkpoint_epoch": extra.get("epoch"),
              "tta": tta, **task.evaluate(logits, task.batch_targets(part.y, 0, len(part.y)), meta["class_names"])}
    leak_free = leak_free_scores(task, data_cfg.cache_dir, data_cfg.name, split_name, part.y, logits,
                                 meta["class_names"])
    if leak_free is not None:
        result["leak_free"] = leak_free
    if not data and not split:  # the run's own held-out data: fit the temperature its answers are scaled by
        calibration = calibrate(model, task, ds, split_name, part, logits if not tta else None, cfg, device)
        if calibration is not None:
            result["calibration"] = calibration
            model.meta["temperature"] = calibration["temperature"]
            save_weights(model, run_dir / "best.safetensors", {**extra, "calibration": calibration})
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    console.print(task.table(result))
    if leak_free is not None:
        console.print(f"without the {leak_free['leaked']} test images with a near copy in train "
                      f"({leak_free['num_images']} images): {leak_free['headline']}")
    if "calibration" in result:
        c = result["calibration"]
        console.print(f"calibration: temperature {c['temperature']:.3f} fitted on {c['fitted_on']}; ECE (15 bins) on "
                      f"{c['measured_on']} {c['ece_before']:.4f} → {c['ece_after']:.4f}")
    return result, logits


def calibrate(model, task, ds, split_name: str, part, plain_logits: torch.Tensor | None, cfg,
              device: torch.device) -> dict | None:
    """The temperature of the run's answers, fitted on held-out data the model never trained on: the
    val split (measured on the evaluated split), or, when the evaluated split is the only held-out one,
    a seeded half of it (measured on the other half). Fitted on plain outputs (no TTA), as answers
    are given. None for a task whose answers carry no calibrated probability."""
    if plain_logits is None:
        plain_logits = predict_logits(model, part.x, 512, device, channels_last=cfg.train.channels_last)
    check = task.calibration_pairs(plain_logits, task.batch_targets(part.y, 0, len(part.y)))
    if check is None or len(check[1]) < 2:
        return None
    if ds.val is not None and len(ds.val) and split_name != "val":
        val_logits = predict_logits(model, ds.val.x, 512, device, channels_last=cfg.train.channels_last)
        fit = task.calibration_pairs(val_logits, task.batch_targets(ds.val.y, 0, len(ds.val.y)))
        return held_out_temperature(fit, check, "val", split_name)
    first, second = halves(len(check[1]), cfg.train.seed)
    return held_out_temperature((check[0][first], check[1][first]), (check[0][second], check[1][second]),
                                f"{split_name} (a seeded half)", f"{split_name} (the other half)")


def predict(run_dir: Path, paths: list[str], k: int | None = None, out_dir: Path | None = None,
            overlay: bool = False, annotate_dir: Path | None = None) -> list[dict]:
    """The task's answer (top-k classes for a classifier; a mask per image for segmentation, written
    as a PNG into `out_dir`, default RUN/predictions, with an overlay PNG when `overlay`; boxes in the
    image's own pixels for a detector) for image files (folders expanded). `k`: classes or boxes per
    image (None: the task's default). `annotate_dir`: also write each image with its answer drawn on it
    there (<stem>.annotated.png; a task whose answers are drawn). Unreadable files are reported, not fatal."""
    model = load_model(run_dir, "cpu")
    task = get_task(task_of(model.meta))
    if annotate_dir is not None and not task.DRAWS_ANSWERS:  # refused before any work
        raise ValueError(f"--annotate {annotate_dir}: {task.NOT_DRAWN}")
    files = expand_image_paths(paths)
    run_config = Path(run_dir) / "config.yaml"  # the run's own pixel limit, when it is a run folder
    max_pixels = load_run_config(run_dir).data.max_pixels if run_config.is_file() else None
    batches, good, skipped = load_image_batches(files, model.meta, max_pixels)
    results = [{"file": name, "error": reason} for name, reason in skipped]
    run_folder = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    out_dir = Path(out_dir) if out_dir else run_folder / "predictions"
    files_left = iter(good)
    for x in batches:
        paths_x = [next(files_left) for _ in range(len(x))]
        sizes = [image_size(path) for path in paths_x]  # (H, W) as given: the model saw x resized
        answers = task.answers(predict_logits(model, x), model.meta, k, image_sizes=sizes)
        for image, answer, path in zip(x, answers, paths_x):
            saved = task.save_answer(answer, image, out_dir, path.stem, model.meta, overlay)
            if annotate_dir is not None:
                saved = {**saved, "annotated_file": str(write_annotated(task, answer, path, annotate_dir, model.meta))}
            results.append({"file": str(path), **saved})
    return results


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header."""
    header = read_header(path.read_bytes())
    return header.height, header.width


def write_annotated(task, answer: dict, path: Path, out_dir: Path, meta: dict) -> Path:
    """OUT/<stem>.annotated.png: the image file at its own size with the task's answer drawn on it."""
    from PIL import Image

    pixels = pil_decode(path.read_bytes())  # (1 or 3, H, W) uint8
    drawn = task.draw_answer(answer, pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0), meta)
    out = Path(out_dir) / f"{path.stem}.annotated.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn).save(out)
    return out


def prediction_lines(run_dir: Path, results: list[dict]) -> list[str]:
    """predict()'s results as terminal lines, one per file, in the model's task's words."""
    model_path = Path(run_dir) / "best.safetensors" if Path(run_dir).is_dir() else Path(run_dir)
    task = get_task(task_of(read_metadata(model_path)[0]))
    return [f"{escape(r['file'])}: [red]unreadable[/] ({escape(r['error'])})" if "error" in r
            else f"{escape(r['file'])}: {escape(task.answer_text(r))}" for r in results]


def run(recipe: str | None, overrides: list[str], console: Console | None = None) -> Path:
    """The main job: train the recipe, then evaluate the best checkpoint on the held-out split and
    write the report."""
    console = console or Console(soft_wrap=True)
    cfg = load_config(recipe, overrides)
    run_dir = train(cfg, console=console)
    _, logits = evaluate_run(run_dir, console=console)
    report(run_dir, console=console, eval_logits=logits)  # the same predictions, not computed twice
    console.print(f"done: {run_dir}")
    return run_dir


def report(run_dir: Path, calibrate: bool = False, console: Console | None = None,
           eval_logits: torch.Tensor | None = None) -> Path:
    """RUN/report.html + RUN/plots/; attached to the run's MLflow run when it was tracked.
    `eval_logits`: the best checkpoint's outputs on the held-out split, when the caller has them."""
    from cvrecipe.evaluate.report import write_report
    from cvrecipe.train.tracking import log_report

    path = write_report(run_dir, calibrate, console, eval_logits)
    log_report(run_dir)
    return path
