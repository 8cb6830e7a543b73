"""Checkpoints: weights as safetensors (with the model's metadata), resume state via torch.save.

Both are written to a temporary file and renamed into place, so a process killed mid-write
leaves the previous checkpoint intact. Resume files are loaded with weights_only=True: only
tensors and plain Python values, never arbitrary pickled objects.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cvrecipe.models import ImageModel, model_from_meta


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_weights(model: ImageModel, path: Path, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"cvrecipe.model": json.dumps(model.meta), "cvrecipe.extra": json.dumps(extra or {})}
    _atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def read_metadata(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "cvrecipe.model" not in meta:
        raise ValueError(f"{path} is not a cvrecipe checkpoint (no model metadata)")
    return json.loads(meta["cvrecipe.model"]), json.loads(meta.get("cvrecipe.extra", "{}"))


def load_model(path: Path, device: torch.device | str = "cpu") -> ImageModel:
    """Rebuild the model from its stored metadata and load its weights; no training code needed."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta, _ = read_metadata(path)
    model = model_from_meta(meta)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def save_resume(state: dict, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
