"""Checkpoints: weights as safetensors (with the model's metadata), resume state via torch.save.

Both are written to a temporary file and renamed into place, so a process killed mid-write
leaves the previous checkpoint intact. Resume files are loaded with weights_only=True: only
tensors and plain Python values, never arbitrary pickled objects. A file that is not a
checkpoint cvrecipe wrote (garbage, a tampered header, a pickle that would run code) is refused
with NotACheckpoint, one line naming the file and why.
"""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cvrecipe.models import ImageModel, model_from_meta

RESUME_KEYS = ("epoch", "step", "history", "model")  # what every last.ckpt cvrecipe writes holds
# pickle opcodes that name a function or class to call: what unpickling would execute
CALLING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


class NotACheckpoint(ValueError):
    """A file that is not a checkpoint written by cvrecipe; the message names it and says why."""


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"no checkpoint at {path}") from err
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (unreadable safetensors: {_first_line(err)})") from err
    if "cvrecipe.model" not in meta:
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (no model metadata)")
    try:
        model, extra = json.loads(meta["cvrecipe.model"]), json.loads(meta.get("cvrecipe.extra", "{}"))
    except ValueError as err:
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (damaged metadata: {err})") from err
    if not isinstance(model, dict) or not isinstance(extra, dict):
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (damaged metadata)")
    return model, extra


def load_model(path: Path, device: torch.device | str = "cpu") -> ImageModel:
    """Rebuild the model from its stored metadata and load its weights; no training code needed."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta, _ = read_metadata(path)
    try:
        model = model_from_meta(meta)
    except (KeyError, TypeError, ValueError) as err:
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (its metadata does not describe a model: "
                             f"{_first_line(err)})") from err
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError) as err:
        raise NotACheckpoint(f"{path}: the weights do not fit the model its metadata describes "
                             f"({_first_line(err)})") from err
    return model.to(device).eval()


def save_resume(state: dict, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict:
    """last.ckpt's state; tensors and plain values only (weights_only=True)."""
    try:
        with warnings.catch_warnings():  # torch's note on unusual pickle protocols: the refusal below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch refuses garbage and a pickle that names functions alike ("weights only load failed")
        if "weights only" in str(err).lower() and _calls_code(path):
            raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (refused: loading it would run code)") from None
        if "weights only" in str(err).lower():
            raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (unreadable: neither a file torch.save writes "
                                 f"nor any pickle)") from None
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (unreadable: {_first_line(err)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (unreadable: {_first_line(err)})") from None
    if not isinstance(state, dict) or any(key not in state for key in RESUME_KEYS):
        raise NotACheckpoint(f"{path}: not a cvrecipe checkpoint (no training state in it)")
    return state


def _calls_code(path: Path) -> bool:
    """Whether `path` is a whole pickle (plain, or the data.pkl of torch.save's zip) that names a
    function or class, read opcode by opcode without executing any. Random bytes are no pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member is not None else b""
        else:
            data = Path(path).read_bytes()
        opcodes = {opcode.name for opcode, _, _ in pickletools.genops(data)}
    except Exception:  # noqa: BLE001 - whatever the parser trips on, the bytes are no pickle
        return False
    return bool(opcodes & CALLING_OPCODES)
