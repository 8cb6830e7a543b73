"""Segmentation's answer layer, NumPy only: a class per pixel, the classes' areas and the mean
confidence (the largest class probability, softmax(logits / T) per pixel, averaged over pixels;
T = meta["temperature"] where one was fitted, else 1)."""
from __future__ import annotations

import numpy as np


def temperature(meta: dict) -> float:
    return float(meta.get("temperature") or 1.0)


def mask_and_confidence(logits: np.ndarray, temp: float = 1.0) -> tuple[np.ndarray, float]:
    """(K, H, W) logits → (H, W) uint8 class indices and the mean per-pixel max probability."""
    z = np.asarray(logits, np.float32) / temp
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return z.argmax(axis=0).astype(np.uint8), float((1 / e.sum(axis=0)).mean())  # max prob = e^0 / Σ e


def areas(mask: np.ndarray, class_names: list[str]) -> list[dict]:
    """Pixels and share of the image per class for one (H, W) class-index mask."""
    counts = np.bincount(mask.ravel(), minlength=len(class_names))[:len(class_names)]
    total = max(mask.size, 1)
    return [{"class": c, "pixels": int(n), "fraction": float(n / total)} for c, n in zip(class_names, counts)]


def answers(outputs: np.ndarray, meta: dict, k: int = 5) -> list[dict]:
    """Per image of (N, K, H, W) logits: its mask (H, W) uint8, the per-class areas and the mean confidence."""
    out = []
    for logits in outputs:
        mask, confidence = mask_and_confidence(logits, temperature(meta))
        out.append({"mask": mask, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                    "areas": areas(mask, meta["class_names"]), "mean_confidence": confidence})
    return out


def text(answer: dict) -> str:
    areas_ = "  ".join(f"{a['class']} {a['fraction']:.1%}" for a in answer["areas"])
    where = f"  → {answer['mask_file']}" if "mask_file" in answer else ""
    return f"{answer['width']}x{answer['height']}: {areas_}{where}"
