"""The decoded-image cache: uint8 arrays stored once per content key, reloaded in milliseconds."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_ENV = "CVRECIPE_CACHE"


def cache_root(override: str | None = None) -> Path:
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cvrecipe"
    return Path(root)


def load_arrays(folder: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """Arrays and metadata saved by `save_arrays`, or None when the entry is absent or incomplete."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in meta["arrays"]}
    return arrays, meta


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write all arrays and meta.json into a temp folder, then rename it into place atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1))
        if folder.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp)
            return
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
