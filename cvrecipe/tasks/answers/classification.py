"""Classification's answer layer, NumPy only: the k most probable classes of each image.

`predict`, the server and the monitor all answer through here, so they say the same thing. The
probabilities are softmax(logits / T), T being the temperature fitted on held-out data when the
run was evaluated (meta["temperature"]; 1 when none was fitted): calibrated answers, whose
confidence matches how often they are right.
"""
from __future__ import annotations

import numpy as np


def temperature(meta: dict) -> float:
    """The temperature an artifact's answers are scaled by (1: none fitted)."""
    return float(meta.get("temperature") or 1.0)


def probabilities(logits: np.ndarray, temp: float = 1.0) -> np.ndarray:
    """(N, K) logits → (N, K) softmax(logits / temp), in float64."""
    z = np.asarray(logits, np.float64) / temp
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, class_names: list[str], k: int, temp: float = 1.0) -> list[list[dict]]:
    """Per image, the k most probable classes [{"class", "probability"}], most probable first."""
    probs = probabilities(logits, temp)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, probs.shape[1])]
    return [[{"class": class_names[i], "probability": float(p[i])} for i in row] for p, row in zip(probs, order)]


def answers(outputs: np.ndarray, meta: dict, k: int = 5) -> list[dict]:
    """Per image of (N, K) logits, the answer {"top": [{"class", "probability"}, ...]}."""
    return [{"top": top} for top in top_k(outputs, meta["class_names"], k, temperature(meta))]


def text(answer: dict) -> str:
    """One answer as one line for the terminal."""
    return "  ".join(f"{t['class']} {t['probability']:.3f}" for t in answer["top"])
