"""model.json: everything a consumer needs besides the model file itself.

It records how to turn an image file into the model's input (size, channel order, resize rule,
dtype; mean/std for reference, since the graph applies them itself), the class names, where the
weights came from, and a sha256 per exported file so a server can refuse a file that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from cvrecipe.imagefile import DRAFT_FACTOR, GRAYSCALE_RULE

MANIFEST = "model.json"
FORMAT_VERSION = 1

RESIZE_RULE = ("decode (alpha composited onto white; 16-bit scaled to 8-bit; a JPEG at least "
               f"{DRAFT_FACTOR}x input_size per side decoded at the smallest 1/2, 1/4 or 1/8 DCT scale that keeps it "
               "at least 2x input_size), convert to the model's channels, then, if (H, W) differs from input_size, "
               "resize the whole image to input_size (bilinear, antialiased, aspect ratio not kept, no crop) and "
               "round to uint8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """A fingerprint of the weights themselves (names, shapes, dtypes, bytes), whatever file held them."""
    import torch  # here, not at the top: a server reads model.json without torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_manifest(meta: dict, source: dict) -> dict:
    """The file-independent part of model.json, from the model's metadata and where it came from."""
    from cvrecipe.tasks import get_task, task_of

    channels = meta["in_channels"]
    return {
        "format_version": FORMAT_VERSION,
        "task": task_of(meta),
        "model": {"name": meta["name"], "num_classes": meta["num_classes"], "kwargs": meta.get("kwargs", {})},
        "class_names": list(meta["class_names"]),
        "preprocessing": {
            "input_name": "image",
            "input_dtype": "uint8",
            "layout": "NCHW",
            "channels": channels,
            "channel_order": "RGB" if channels == 3 else ("L" if channels == 1 else f"{channels} channels"),
            "input_size": list(meta["input_size"]),  # [H, W]
            "resize": RESIZE_RULE,
            "grayscale": GRAYSCALE_RULE,
            "value_range": [0, 255],
            # applied inside the model: x = (uint8 / 255 - mean) / std; listed here for reference
            "normalization_in_model": True,
            "mean": meta.get("mean") or [0.0] * channels,
            "std": meta.get("std") or [1.0] * channels,
        },
        "output": get_task(task_of(meta)).output_spec(meta["num_classes"]),
        **{key: meta[key] for key in ("tile", "class_colours", "temperature") if meta.get(key)},
        "source": source,
        "files": {},
    }


def set_shapes(manifest: dict) -> dict:
    """Each file's input and output shapes, with its batch dimension (fixed, or "batch" for any), and
    at the top the output shape all files share: a batch-1 export says [1, K], not ["batch", K]."""
    pre, output = manifest["preprocessing"], manifest["output"]
    batches = set()
    for entry in manifest["files"].values():
        batch = entry.get("batch_size") or "batch"
        entry["input_shape"] = [batch, pre["channels"], *pre["input_size"]]
        entry["output_shape"] = [batch, *output["shape"][1:]]
        batches.add(batch)
    output["shape"] = [batches.pop() if len(batches) == 1 else "batch", *output["shape"][1:]]
    return manifest


def file_entry(path: Path, fmt: str, precision: str, facts: dict, parity: dict) -> dict:
    import torch

    return {"format": fmt, "precision": precision, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, **facts,
            "parity": parity}


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {export_dir}; create it with `cvrecipe export RUN`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def write_manifest(manifest: dict, export_dir: Path) -> None:
    """Write model.json atomically: readers see the old file or the new one, never half of one."""
    path = Path(export_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def verify_file(export_dir: Path, filename: str) -> dict:
    """The manifest's entry for `filename` after checking that the file's sha256 still matches it."""
    manifest = read_manifest(export_dir)
    entry = manifest["files"].get(filename)
    path = Path(export_dir) / filename
    if entry is None:
        raise FileNotFoundError(f"{export_dir / MANIFEST} lists no {filename} (it lists: "
                                f"{', '.join(manifest['files']) or 'nothing'})")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {MANIFEST} but missing")
    if sha256_file(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in {MANIFEST}; export it again")
    return entry
