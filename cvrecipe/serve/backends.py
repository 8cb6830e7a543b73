"""Backends: find the model file a server should load, load it, warm it up.

Three kinds of file are served, each loaded without unpickling arbitrary objects:
ONNX (ONNX Runtime), TorchScript (`torch.jit.load`), and a run's best.safetensors (the eager
model, rebuilt from the metadata stored in the file). Exported files are checked against the
sha256 in their model.json before loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvrecipe.export import manifest as mf
from cvrecipe.tasks.registry import spec_of, task_of

KINDS = {".onnx": "onnx", ".pt": "torchscript", ".safetensors": "safetensors"}


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the file to load
    kind: str  # onnx | torchscript | safetensors

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.kind == "onnx" else "torch"


def resolve_source(path: Path, backend: str = "auto") -> ModelSource:
    """The model file behind a run folder, an export folder or a file, for `backend`.

    auto prefers ONNX Runtime when an ONNX export exists; otherwise torch (a TorchScript export
    in an export folder, or the eager model from a run's best.safetensors).
    """
    path = Path(path)
    if path.is_file():
        kind = KINDS.get(path.suffix)
        if kind is None:
            raise ValueError(f"cannot serve {path}: expected a .onnx, .pt or .safetensors file")
        source = ModelSource(path, kind)
    elif (path / mf.MANIFEST).is_file():
        source = _from_export_dir(path, backend)
    elif (path / "best.safetensors").is_file():
        export_dir = path / "export"
        if backend != "torch" and (export_dir / "model.onnx").is_file():
            source = ModelSource(export_dir / "model.onnx", "onnx")
        elif backend == "onnxruntime":
            raise FileNotFoundError(f"{path} has no ONNX export ({export_dir / 'model.onnx'}); create it with "
                                    f"`cvrecipe export {path} --format onnx --dynamic-batch` or use --backend torch")
        else:
            source = ModelSource(path / "best.safetensors", "safetensors")
    else:
        raise FileNotFoundError(f"{path} is neither a run folder (best.safetensors), an export folder "
                                f"({mf.MANIFEST}) nor a .onnx/.pt/.safetensors file")
    if backend != "auto" and source.backend != backend:
        raise ValueError(f"{source.path} is a {source.kind} file, which the {backend} backend cannot run")
    return source


def _from_export_dir(path: Path, backend: str) -> ModelSource:
    files = mf.read_manifest(path).get("files", {})
    wanted = {"onnxruntime": ["model.onnx"], "torch": ["model.pt"], "auto": ["model.onnx", "model.pt"]}[backend]
    for name in wanted:
        if name in files:
            return ModelSource(path / name, KINDS[Path(name).suffix])
    raise FileNotFoundError(f"{path / mf.MANIFEST} lists {', '.join(files) or 'no files'}; the {backend} backend "
                            f"needs {' or '.join(wanted)}")


class EagerRunner:
    """The eager model from a safetensors checkpoint, with the runners' predict interface."""

    fixed_batch = None

    def __init__(self, path: Path, device):
        import torch

        from cvrecipe.artifact.checkpoint import load_model

        self.torch, self.device = torch, device
        self.model = load_model(path, device)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            batch = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).to(self.device)
            return self.model(batch).float().cpu().numpy()

    def predict_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from cvrecipe.artifact.inference import predict_features

        return predict_features(self.model, x, batch_size=len(x), device=self.device)


@dataclass
class Backend:
    """A loaded model: `predict(uint8 (B, C, H, W)) → float32 logits (B, K)` (or (B, K, H, W) for a
    segmentation model, detection rows (B, 100, 6) for a detector) plus what describes it; `decode` and
    `outputs` run it the way it must be run (a model whose task runs whole images: on each image at its
    own size, in overlapping tiles: tiling.py)."""

    runner: Any
    source: ModelSource
    version: str  # first 12 hex digits of the model file's sha256
    info: dict  # name, class_names, in_channels, input_size, precision, source run

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.runner.predict(x)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.info["in_channels"], *self.info["input_size"])  # (C, H, W)

    @property
    def whole_images(self) -> bool:
        """Does the model's task run each image at its own size (in tiles) rather than resized?"""
        return spec_of(self.info["task"]).whole_images(self.info)

    def decode(self, blobs: list[bytes], max_pixels: int) -> list:
        """Per file, the image as this model takes it (resized to the input size, or at its own size for a
        tiled model), or the ServeError that refused it."""
        from cvrecipe.serve.inputs import decode_batch

        return decode_batch(blobs, self.input_shape, max_pixels, keep_size=self.whole_images)

    def outputs(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Per decoded image (C, H, W), the model's outputs: logits (K,), detection rows (D, 6), or
        (K, H, W) for a tiled model (each image alone, in tiles of the input size)."""
        if not self.whole_images:
            return list(self.predict(np.stack(images)))  # one forward pass for the whole batch
        import torch

        from cvrecipe.artifact.tiling import run_outputs

        def tiles(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(self.predict(x.numpy()), np.float32))

        return [run_outputs(tiles, torch.from_numpy(image[None]), self.info)[0].numpy() for image in images]

    def outputs_and_features(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
        """outputs(images), and for a classifier whose runner gives them, the penultimate features
        (N, D) from the same forward pass (else None: a TorchScript file, a tiled model, a task whose
        monitor follows no embedding)."""
        embeds = spec_of(self.info["task"]).MONITOR == "images"  # only the image monitor embeds features
        if self.whole_images or not embeds or not hasattr(self.runner, "predict_features"):
            return self.outputs(images), None
        logits, features = self.runner.predict_features(np.stack(images))
        return list(logits), features

    def describe(self) -> dict:
        return {**self.info, "version": self.version, "backend": self.source.backend, "format": self.source.kind,
                "file": str(self.source.path), "fixed_batch_size": self.runner.fixed_batch}


def load_backend(source: ModelSource, ort_options: dict | None = None) -> Backend:
    """Load `source` (checking an export's sha256 first); the device is the CPU for ONNX Runtime,
    the best available one for torch. `ort_options`: OnnxRunner's keyword arguments (threads,
    optimization, io_binding). torch is imported only for the torch backends."""
    if source.kind == "safetensors":
        from cvrecipe.device import resolve_device
        from cvrecipe.artifact.checkpoint import read_metadata

        meta, _ = read_metadata(source.path)
        version = mf.sha256_file(source.path)[:12]
        info = {"task": task_of(meta), "name": meta["name"], "class_names": meta["class_names"],
                "in_channels": meta["in_channels"],
                "input_size": list(meta["input_size"]), "precision": "fp32", "run": str(source.path.parent),
                **{key: meta[key] for key in ("tile", "class_colours", "temperature") if meta.get(key)}}
        return Backend(EagerRunner(source.path, resolve_device("auto")), source, version, info)
    entry = mf.verify_file(source.path.parent, source.path.name)
    manifest = mf.read_manifest(source.path.parent)
    pre = manifest["preprocessing"]
    info = {"task": task_of(manifest), "name": manifest["model"]["name"],
            "class_names": manifest["class_names"], "in_channels": pre["channels"],
            "input_size": list(pre["input_size"]), "precision": entry["precision"],
            "run": manifest["source"].get("run"),
            **{key: manifest[key] for key in ("tile", "class_colours", "temperature") if manifest.get(key)}}
    if source.kind == "onnx":
        from cvrecipe.export.onnx import OnnxRunner

        runner = OnnxRunner(source.path, spin=False, **(ort_options or {}))
    else:
        from cvrecipe.device import resolve_device
        from cvrecipe.export.torchscript import TorchScriptRunner

        runner = TorchScriptRunner(source.path, resolve_device("auto"))
    return Backend(runner, source, entry["sha256"][:12], info)


def warm_up(backend: Backend, max_batch_size: int, passes: int) -> None:
    """Run zero images at batch sizes 1 and `max_batch_size`, so first requests do not pay for
    lazy initialisation (allocator growth, kernel selection), and check the outputs' shape is what the
    model's task expects (its spec's `outputs_fit`)."""
    task = backend.info["task"]
    for size in sorted({1, max_batch_size}):
        x = np.zeros((size, *backend.input_shape), np.uint8)
        for _ in range(passes):
            outputs = backend.predict(x)
        if not spec_of(task).outputs_fit(outputs.shape, size, len(backend.info["class_names"])):
            raise ValueError(f"{backend.source.path} gives outputs of shape {outputs.shape} for {size} images, "
                             f"which is not what a {task} model with {len(backend.info['class_names'])} classes "
                             f"gives ({spec_of(task).outputs_fit.__doc__.strip()})")
