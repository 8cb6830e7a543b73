"""The reference profile: what served traffic is compared with.

Written beside model.json as profile.json by `cvrecipe export` (and `cvrecipe monitor profile RUN`
for older exports) from the run's held-out split, run through the eager model. It holds samples,
not histograms, so the server can run two-sample tests:

- the predicted-class counts and the confidence (max softmax probability) of each image;
- input statistics per image (stats.input_stats, plus the stored image size √(H·W));
- an embedding summary: the penultimate features (the input of the classifier's head) projected
  by PCA (fitted here) to at most EMBED_DIMS dimensions, a reference sample of them, the RBF
  bandwidth (median heuristic) and the MMD² that windows of clean held-out images reach (the null
  distribution, per window size), from which the server's thresholds come; and the same summary of
  the logits, which every served format outputs, for a server whose model file does not give the
  features (TorchScript).

The held-out images are split in two: the first part is the reference the server compares with,
the rest calibrates the MMD thresholds (windows drawn from images the reference does not hold).

A segmentation model's profile ("signals": "pixels") holds what is cheap to follow per served
image: its predicted pixels per class (pooled, the class mix is compared with) and its mean
per-pixel confidence (the mean over pixels of the largest class probability).

A detector's profile ("signals": "boxes") holds its boxes scoring at least a floor (the answer
layer's default, 0.25): their classes (pooled counts), their scores (pooled sample) and the number
per image, plus the images' input statistics.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from cvrecipe.monitor import stats

PROFILE = "profile.json"
FORMAT_VERSION = 1
EMBED_DIMS = 16
MAX_REFERENCE = 1000  # images in the reference part (the rest calibrate the embedding thresholds)
NULL_SIZES = (50, 100, 200, 500, 1000)  # window sizes the MMD² null distribution is drawn for
NULL_DRAWS = 200
MAX_IMAGES = 3000  # held-out images used by default


def build_profile(images: np.ndarray, logits: np.ndarray, class_names: list[str], source: dict | None = None,
                  seed: int = 0, features: np.ndarray | None = None, temperature: float = 1.0) -> dict:
    """The profile of uint8 images (N, C, H, W), the model's logits on them (N, K) and its penultimate
    features (N, D), if it has them. Confidences are softmax(logits / temperature), as the answers
    the server gives (tasks/answers/)."""
    if len(images) != len(logits) or len(images) < 20:
        raise ValueError(f"a profile needs at least 20 images with one logit row each; got {len(images)} images "
                         f"and {len(logits)} logit rows")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    images, logits = images[order], logits[order].astype(np.float64)
    features = None if features is None else features[order].astype(np.float64)
    n_ref = min(MAX_REFERENCE, len(images) // 2)
    probs = stats.softmax(logits / temperature)
    inputs = stats.input_stats(images)
    inputs["size"] = np.full(len(images), float(np.sqrt(images.shape[2] * images.shape[3])))
    profile = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source or {},
        "images": int(n_ref),
        "class_names": list(class_names),
        "class_counts": np.bincount(probs[:n_ref].argmax(1), minlength=len(class_names)).tolist(),
        "confidence": _rounded(probs[:n_ref].max(1)),
        "inputs": {name: _rounded(values[:n_ref]) for name, values in inputs.items()},
        "embedding": _embedding("logits-pca", logits, n_ref, rng),
    }
    if features is not None:
        profile["embedding_features"] = _embedding("features-pca", features, n_ref, rng)
    return profile


def build_pixel_profile(pixel_counts: np.ndarray, confidence: np.ndarray, class_names: list[str],
                        source: dict | None = None) -> dict:
    """The profile of a segmentation model from its answers on held-out images: predicted pixels per
    class (N, K) and mean per-pixel confidence (N,) of each image."""
    pixel_counts = np.asarray(pixel_counts, np.int64)
    if pixel_counts.ndim != 2 or len(pixel_counts) != len(confidence) or len(pixel_counts) < 1:
        raise ValueError(f"a segmentation profile needs one row of pixel counts and one confidence per image; got "
                         f"{pixel_counts.shape} counts and {len(confidence)} confidences")
    return {"format_version": FORMAT_VERSION, "signals": "pixels", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source or {}, "images": len(pixel_counts), "class_names": list(class_names),
            "pixel_counts": pixel_counts.sum(0).tolist(), "confidence": _rounded(confidence)}


def build_box_profile(images: np.ndarray, rows: np.ndarray, class_names: list[str], source: dict | None = None,
                      score_threshold: float = 0.25) -> dict:
    """The profile of a detector from uint8 images (N, C, H, W) and its detections on them (N, D, 6)
    rows [x1, y1, x2, y2, score, class]: the boxes scoring at least `score_threshold`."""
    if len(images) != len(rows) or len(rows) < 1:
        raise ValueError(f"a detection profile needs one row block per image; got {len(images)} images and "
                         f"{len(rows)} row blocks")
    kept = (rows[..., 5] >= 0) & (rows[..., 4] >= score_threshold)  # (N, D)
    inputs = stats.input_stats(images)
    inputs["size"] = np.full(len(images), float(np.sqrt(images.shape[2] * images.shape[3])))
    return {"format_version": FORMAT_VERSION, "signals": "boxes", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source or {}, "images": len(rows), "class_names": list(class_names),
            "score_threshold": score_threshold,
            "box_counts": np.bincount(rows[..., 5][kept].astype(np.int64), minlength=len(class_names)).tolist(),
            "scores": _rounded(rows[..., 4][kept]), "boxes_per_image": kept.sum(1).tolist(),
            "inputs": {name: _rounded(values) for name, values in inputs.items()}}


def _embedding(kind: str, x: np.ndarray, n_ref: int, rng) -> dict:
    """PCA of x's first n_ref rows, that reference in PCA space, and the MMD² null of the other rows."""
    mean, components = _pca(x[:n_ref], min(EMBED_DIMS, x.shape[1]))
    embedded = (x - mean) @ components.T  # (N, d)
    reference, pool = embedded[:n_ref], embedded[n_ref:]
    bandwidth = stats.median_bandwidth(reference)
    return {"kind": kind, "mean": _rounded(mean), "components": [_rounded(c) for c in components],
            "bandwidth": bandwidth, "reference": [_rounded(r) for r in reference],
            "null_mmd2": _null_mmd2(reference, pool, bandwidth, rng)}


def _pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (K,), components (dims, K)) of x by sklearn's PCA."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(dims, len(x) - 1, x.shape[1]), random_state=0).fit(x)
    return pca.mean_, pca.components_


def _null_mmd2(reference: np.ndarray, pool: np.ndarray, bandwidth: float, rng) -> dict[str, list[float]]:
    """Per window size n (as a string), sorted MMD² of NULL_DRAWS windows of n pool images against
    the reference: what clean traffic gives. Sizes above half the pool are left out (draws would
    overlap too much to vary)."""
    kxx = stats.mean_rbf(reference, reference, bandwidth)
    out = {}
    for n in NULL_SIZES:
        if n > len(pool) // 2:
            break
        draws = [stats.rbf_mmd2(reference, pool[rng.choice(len(pool), n, replace=False)], bandwidth, kxx)
                 for _ in range(NULL_DRAWS)]
        out[str(n)] = _rounded(np.sort(draws))
    return out


def _rounded(x: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(x, np.float64).ravel()]


def write_profile(profile: dict, folder: Path) -> Path:
    """Write folder/profile.json atomically."""
    path = Path(folder) / PROFILE
    tmp = path.with_name(f".{PROFILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile))
    os.replace(tmp, path)
    return path


def read_profile(path: Path) -> dict:
    try:
        profile = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}; write it again with `cvrecipe monitor profile RUN`") from err
    if profile.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: profile format_version {profile.get('format_version')}, expected {FORMAT_VERSION}")
    return profile


def find_profile(model_file: Path) -> Path | None:
    """The profile that belongs to a served model file: beside it (an export folder), or in the
    run's export/ folder when the file is a run's best.safetensors."""
    model_file = Path(model_file)
    for folder in (model_file.parent, model_file.parent / "export"):
        if (folder / PROFILE).is_file():
            return folder / PROFILE
    return None


def profile_run(run_dir: Path, out_dir: Path | None = None, max_images: int = MAX_IMAGES) -> Path:
    """Profile a run's best checkpoint on up to `max_images` images of its held-out split (test
    when the dataset has one, else val); written to out_dir (default RUN/export, created if needed)."""
    import torch

    from cvrecipe.artifact.checkpoint import load_model
    from cvrecipe.artifact.inference import iter_logits, predict_features, predict_logits
    from cvrecipe.config import load_run_config
    from cvrecipe.data import load_dataset
    from cvrecipe.export import manifest as mf
    from cvrecipe.tasks import answers_of, spec_of, task_of

    run_dir = Path(run_dir)
    checkpoint = run_dir / "best.safetensors"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no best.safetensors)")
    model = load_model(checkpoint, "cpu")
    cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    split_name, split = ds.eval_split
    images = split.x[:max_images]
    source = {"run": str(run_dir), "checkpoint_sha256": mf.sha256_file(checkpoint),
              "images": f"{ds.name} {split_name}, first {len(images)}", "held_out_used": len(images)}
    class_names, task = list(model.meta["class_names"]), task_of(model.meta)
    signals = spec_of(task).MONITOR  # what the task's monitor follows
    if signals == "pixels":
        counts, confidence = [], []
        for outputs in iter_logits(model, images, batch_size=8, device=torch.device("cpu")):  # (B, K, H, W)
            counts += [torch.bincount(o.argmax(0).flatten(), minlength=len(class_names)).numpy() for o in outputs]
            confidence += outputs.softmax(1).amax(1).mean((1, 2)).tolist()
        profile = build_pixel_profile(np.stack(counts), np.asarray(confidence), class_names, source)
    elif signals == "boxes":
        rows = predict_logits(model, images, batch_size=64, device=torch.device("cpu")).numpy()  # (N, D, 6)
        profile = build_box_profile(np.asarray(images), rows, class_names, source, answers_of(task).SCORE_THRESHOLD)
    else:
        logits, features = predict_features(model, images, batch_size=256, device=torch.device("cpu"))
        profile = build_profile(np.asarray(images), logits, class_names, source, features=features,
                                temperature=float(model.meta.get("temperature") or 1.0))
    out_dir = Path(out_dir or run_dir / "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    profile["task"] = task
    return write_profile(profile, out_dir)
