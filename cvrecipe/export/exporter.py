"""Export a model (or a run's best checkpoint) and prove the export matches the eager model.

Each export is written into a temporary folder beside the target, run with its own runtime on
real images, compared with the eager fp32 model, and only then moved into `export/`. A failed
check raises with the figures and leaves the target folder as it was.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.tiling import run_outputs
from cvrecipe.export import manifest as mf
from cvrecipe.export import parity
from cvrecipe.export.onnx import OnnxRunner, write_onnx
from cvrecipe.export.torchscript import TorchScriptRunner, write_torchscript
from cvrecipe.models import ImageModel
from cvrecipe.tasks import get_task, task_of

# format → (file name, writer, runner)
FORMATS = {
    "onnx": ("model.onnx", write_onnx, OnnxRunner),
    "torchscript": ("model.pt", write_torchscript, TorchScriptRunner),
}
MAX_CHECK_IMAGES = 1000  # images from the eval split used by the parity check
CHECK_BATCH_SIZES = [64, 7]  # a dynamic-batch export is run at both sizes in turn


class ExportError(RuntimeError):
    """An export that could not be written or did not match the eager model."""


@dataclass
class ExportResult:
    path: Path  # the model file inside the export folder
    manifest: dict  # model.json as written
    parity: parity.ParityReport


class HalfPrecision(nn.Module):
    """Normalise in fp32 (exact for uint8 input), run the network in fp16, return fp32 logits, so
    the exported interface (uint8 in, float32 out) does not depend on the precision."""

    def __init__(self, model: ImageModel):
        super().__init__()
        self.normalize = copy.deepcopy(model.normalize)
        self.net = copy.deepcopy(model.net).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x).half()).float()


def export_model(model: ImageModel, images: np.ndarray, out_dir: Path, fmt: str = "onnx",
                 dynamic_batch: bool = False, half: bool = False, source: dict | None = None,
                 atol: float | None = None, min_agreement: float | None = None) -> ExportResult:
    """Export `model` to `out_dir` in `fmt`, checked on `images` (N, C, H, W) uint8.

    `atol`/`min_agreement` override the task's parity tolerances. Another format
    already in `out_dir` is kept when it was exported from the same weights; exports of other
    weights are removed so the folder never mixes two models.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if len(images) == 0:
        raise ExportError("no images to check the export on")
    filename, write, runner_cls = FORMATS[fmt]
    refusal = getattr(model.net, "export_refusal", None)  # a model may know why it cannot be exported
    reason = refusal(fmt, dynamic_batch) if refusal is not None else None
    if reason:
        raise ExportError(f"{model.meta['name']} cannot be exported to {fmt}"
                          f"{' with a dynamic batch' if dynamic_batch else ''}: {reason}")
    model = model.cpu().eval()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    source = {**(source or {}), "weights_sha256": mf.weights_sha256(model)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        module = HalfPrecision(model) if half else model
        sample = input_sample(images, model.meta)
        try:
            outputs = tuple(get_task(task_of(model.meta)).export_outputs())  # what the graph returns, named
            facts = write(module, sample, tmp / filename, dynamic_batch, outputs)
        except Exception as err:  # noqa: BLE001 - the exporter's own errors are many and varied
            hint = "; install the export extra: pip install 'cvrecipe[export]'" if isinstance(err, ImportError) else ""
            message = f"{fmt} export of {model.meta['name']} failed: {type(err).__name__}: {err}"
            raise ExportError(message + hint) from err
        report = check(model, runner_cls(tmp / filename), images, half, atol, min_agreement)
        if not report.passed:
            raise ExportError(f"{fmt} export does not match the eager model: {report.summary()}; "
                              f"nothing was written to {out_dir}")
        manifest = _merge(out_dir, mf.build_manifest(model.meta, source), filename,
                          mf.file_entry(tmp / filename, fmt, "fp16" if half else "fp32", facts, report.to_dict()))
        _install(tmp, out_dir, filename, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir / filename, manifest, report)


def input_sample(images: np.ndarray, meta: dict) -> torch.Tensor:
    """One image cut to the model's input size (a segmentation model's tile), to trace the export at."""
    h, w = meta["input_size"]
    x = torch.from_numpy(np.ascontiguousarray(images[:1, :, :h, :w]))
    if tuple(x.shape[-2:]) != (h, w):  # smaller than a tile: padded, as tiled inference pads it
        x = torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
    return x


def check(model: ImageModel, runner, images: np.ndarray, half: bool, atol: float | None = None,
          min_agreement: float | None = None) -> parity.ParityReport:
    """Compare `runner.predict` with the eager fp32 model on `images`, by the model's task's measure;
    both run the way the model is run everywhere (in tiles when its meta says so: tiling.py)."""
    reference = predict_logits(model, images, batch_size=256, device=torch.device("cpu")).numpy()
    sizes = [runner.fixed_batch] if runner.fixed_batch else CHECK_BATCH_SIZES

    def exported_outputs(x: np.ndarray) -> np.ndarray:
        tiles = lambda t: torch.from_numpy(np.asarray(runner.predict(t.numpy()), np.float32))  # noqa: E731
        return run_outputs(tiles, torch.from_numpy(np.ascontiguousarray(x)), model.meta).numpy()

    exported = parity.run_in_batches(exported_outputs, images, sizes)
    return get_task(task_of(model.meta)).parity(reference, exported, sizes, half, atol,
                                                                     min_agreement)


def _merge(out_dir: Path, manifest: dict, filename: str, entry: dict) -> dict:
    """The new model.json: this file's entry plus entries of files exported from the same weights."""
    try:
        old = mf.read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        old = None
    if old and old.get("source", {}).get("weights_sha256") == manifest["source"]["weights_sha256"]:
        manifest["files"] = {k: v for k, v in old.get("files", {}).items()
                             if k != filename and (out_dir / k).is_file()}
    manifest["files"][filename] = entry
    return mf.set_shapes(manifest)


def _install(tmp: Path, out_dir: Path, filename: str, manifest: dict) -> None:
    """Move the checked file into place, drop files from other weights, then write model.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, _, _ in FORMATS.values():
        if name not in manifest["files"] and name != filename and (out_dir / name).is_file():
            (out_dir / name).unlink()
    (tmp / filename).replace(out_dir / filename)
    mf.write_manifest(manifest, out_dir)


def export_run(run_dir: Path, fmt: str = "onnx", dynamic_batch: bool = False, half: bool = False,
               out_dir: Path | None = None, max_images: int = MAX_CHECK_IMAGES) -> ExportResult:
    """Export a run's best checkpoint to RUN/export/, checked on up to `max_images` images of the
    run's own held-out split (test when the dataset has one, else val)."""
    from cvrecipe.artifact.checkpoint import load_model, read_metadata
    from cvrecipe.config import load_run_config
    from cvrecipe.data import load_dataset

    run_dir = Path(run_dir)
    checkpoint = run_dir / "best.safetensors"
    model = load_model(checkpoint, "cpu")
    _, extra = read_metadata(checkpoint)
    cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    split_name, split = ds.eval_split
    images = split.x[:min(max_images, get_task(task_of(model.meta)).PARITY_IMAGES)]
    source = {"run": str(run_dir), "checkpoint": checkpoint.name, "checkpoint_sha256": mf.sha256_file(checkpoint),
              "epoch": extra.get("epoch"), "check_images": f"{ds.name} {split_name}, first {len(images)}"}
    return export_model(model, images, out_dir or run_dir / "export", fmt, dynamic_batch, half, source)
