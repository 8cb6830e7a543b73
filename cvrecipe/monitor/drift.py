"""Drift of a window of served predictions against the reference profile, one detector per quantity.

Each detector gives a score, the thresholds it is compared with, and a state ok / warn / alert:

- class mix (predicted classes): population stability index; warn above 0.1, alert above 0.25 (the usual
  rule of thumb); the Jensen–Shannon distance is reported beside it;
- confidence and every input statistic: two-sample Kolmogorov–Smirnov; warn at p < 0.01, alert at
  p < 0.001; the Wasserstein distance (in reference standard deviations) is reported beside it;
- embedding (PCA of the penultimate features, or of the logits where the served model file does
  not give the features): MMD² with an RBF kernel; warn above the 99th percentile and alert
  above the largest of the 200 MMD² values that windows of clean held-out images reached (profile),
  taken at the largest calibrated window size not above the live one (smaller windows vary more,
  so that threshold is the conservative one).

With fewer than `min_samples` predictions in the window every state is "waiting".

A detector (BoxReference) is followed by its boxes at the profile's score floor: the class mix of the
window's boxes, pooled (PSI, as above), the number of boxes per image and the boxes' scores (KS, as
above; a window without a box at all alerts on the class mix and the scores), and the input statistics
(KS, as above).

A segmentation model (PixelReference) is followed by what is cheap per served image: the class mix
of its predicted pixels, pooled over the window (PSI, as above), and each image's mean per-pixel
confidence (KS, as above).
"""
from __future__ import annotations

import numpy as np

from cvrecipe.monitor import stats

STATES = ("waiting", "ok", "warn", "alert")  # worst last; the gauge value is the index - 1 (waiting = -1)
PSI_WARN, PSI_ALERT = 0.1, 0.25
KS_WARN_P, KS_ALERT_P = 0.01, 0.001
BOX_SCORE_FLOOR = 0.25  # a detector's boxes are followed from this score (the answer layer's default floor)


def worst(states) -> str:
    states = list(states)
    return max(states, key=STATES.index) if states else "waiting"


def reference_for(profile: dict):
    """The detectors' reference of a profile: a segmentation model's pixels, or a classifier's images."""
    signals = profile.get("signals") or ("pixels" if "pixel_counts" in profile else "images")  # older profiles
    return {"pixels": PixelReference, "boxes": BoxReference}.get(signals, Reference)(profile)


class Reference:
    """The profile's samples as arrays, ready for the detectors."""

    def __init__(self, profile: dict):
        self.profile = profile
        self.class_names = profile["class_names"]
        self.class_counts = np.asarray(profile["class_counts"], np.float64)
        self.confidence = np.asarray(profile["confidence"])
        self.inputs = {name: np.asarray(v) for name, v in profile["inputs"].items()}
        self.logits_embedding = Embedding(profile["embedding"])
        self.features_embedding = Embedding(profile["embedding_features"]) if "embedding_features" in profile else None

    def detect(self, seen: list, min_samples: int) -> list[dict]:
        """detect() over a window of served images (each with .predicted, .confidence, .inputs, .logits
        and .features)."""
        predicted = np.array([s.predicted for s in seen], np.int64)
        confidence = np.array([s.confidence for s in seen])
        inputs = {n: np.array([s.inputs.get(n, np.nan) for s in seen]) for n in self.inputs}
        logits = np.stack([s.logits for s in seen]) if seen else np.zeros((0, len(self.class_names)))
        # the penultimate features when every image in the window has them, else the logits
        features = np.stack([s.features for s in seen]) if seen and all(s.features is not None for s in seen) \
            else None
        return detect(self, predicted, confidence, inputs, logits, min_samples, features)


class PixelReference:
    """A segmentation model's profile: predicted pixels per class (pooled) and per-image mean confidence."""

    def __init__(self, profile: dict):
        self.profile = profile
        self.class_names = profile["class_names"]
        self.class_counts = np.asarray(profile["pixel_counts"], np.float64)
        self.confidence = np.asarray(profile["confidence"])
        self.inputs: dict = {}

    def detect(self, seen: list, min_samples: int) -> list[dict]:
        """Class mix of the window's pixels (each served image's .pixels, pooled) and the KS test of
        its images' mean confidence."""
        if len(seen) < min_samples:
            return [{"quantity": q, "statistic": None, "score": None, "state": "waiting"}
                    for q in ("class_mix", "confidence")]
        counts = np.sum([s.pixels for s in seen], 0)
        score = stats.psi(self.class_counts, counts)
        d, p = stats.ks(self.confidence, np.array([s.confidence for s in seen]))
        return [{"quantity": "class_mix", "statistic": "psi", "score": score, "warn": PSI_WARN, "alert": PSI_ALERT,
                 "state": _above(score, PSI_WARN, PSI_ALERT), "unit": "pixels",
                 "js_distance": stats.js_distance(self.class_counts, counts)},
                {"quantity": "confidence", "statistic": "ks", "score": d, "p_value": p, "warn": KS_WARN_P,
                 "alert": KS_ALERT_P, "state": "alert" if p < KS_ALERT_P else "warn" if p < KS_WARN_P else "ok"}]


class BoxReference:
    """A detector's profile: its boxes' classes (pooled counts) and scores (pooled sample) at the score
    floor `score_threshold`, its boxes per image, and the images' input statistics."""

    def __init__(self, profile: dict):
        self.profile = profile
        self.class_names = profile["class_names"]
        self.score_threshold = float(profile["score_threshold"])
        self.class_counts = np.asarray(profile["box_counts"], np.float64)
        self.confidence = np.asarray(profile["scores"])  # what the dashboard's score histogram compares with
        self.boxes_per_image = np.asarray(profile["boxes_per_image"], np.float64)
        self.inputs = {name: np.asarray(v) for name, v in profile["inputs"].items()}

    def detect(self, seen: list, min_samples: int) -> list[dict]:
        """Over a window of served images, each with .boxes ((n, 2) [class, score]) and .inputs."""
        names = ["class_mix", "boxes_per_image", "score", *self.inputs]
        if len(seen) < min_samples:
            return [{"quantity": q, "statistic": None, "score": None, "state": "waiting"} for q in names]
        classes = np.concatenate([s.boxes[:, 0] for s in seen]).astype(np.int64)
        counts = np.bincount(classes, minlength=len(self.class_names))
        score = stats.psi(self.class_counts, counts)  # no box at all: every share at the floor, a large PSI
        out = [{"quantity": "class_mix", "statistic": "psi", "score": score, "warn": PSI_WARN, "alert": PSI_ALERT,
                "state": _above(score, PSI_WARN, PSI_ALERT), "unit": "boxes", "boxes": int(len(classes)),
                "js_distance": stats.js_distance(self.class_counts, counts) if len(classes) else 1.0}]
        scores = np.concatenate([s.boxes[:, 1] for s in seen])
        samples = {"boxes_per_image": (self.boxes_per_image, np.array([len(s.boxes) for s in seen], np.float64)),
                   "score": (self.confidence, scores),
                   **{n: (ref, np.array([s.inputs.get(n, np.nan) for s in seen])) for n, ref in self.inputs.items()}}
        for name, (reference, live) in samples.items():
            out.append(_ks_entry(name, reference, live[~np.isnan(live)], min_samples))
        return out


def _ks_entry(name: str, reference: np.ndarray, live: np.ndarray, min_samples: int) -> dict:
    """The KS test of one quantity; a live sample under `min_samples` waits, except an empty sample of
    box scores (no box in the window), which alerts: the detector stopped finding anything."""
    if len(live) < min_samples and not (name == "score" and len(live) == 0):
        return {"quantity": name, "statistic": "ks", "score": None, "state": "waiting"}
    if len(live) == 0:
        return {"quantity": name, "statistic": "ks", "score": 1.0, "p_value": 0.0, "warn": KS_WARN_P,
                "alert": KS_ALERT_P, "state": "alert", "note": "no boxes in the window"}
    d, p = stats.ks(reference, live)
    state = "alert" if p < KS_ALERT_P else "warn" if p < KS_WARN_P else "ok"
    return {"quantity": name, "statistic": "ks", "score": d, "p_value": p, "warn": KS_WARN_P, "alert": KS_ALERT_P,
            "state": state, "wasserstein_sd": stats.wasserstein(reference, live)}


class Embedding:
    """One embedding summary of the profile: PCA, reference sample, RBF bandwidth, MMD² null."""

    def __init__(self, emb: dict):
        self.kind = emb["kind"]
        self.mean = np.asarray(emb["mean"])
        self.components = np.asarray(emb["components"])  # (d, D)
        self.reference = np.asarray(emb["reference"]).reshape(-1, len(self.components))
        self.bandwidth = float(emb["bandwidth"])
        self.kxx = stats.mean_rbf(self.reference, self.reference, self.bandwidth)
        self.null = {int(n): np.asarray(v) for n, v in emb["null_mmd2"].items()}

    def embed(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T

    def mmd2(self, x: np.ndarray) -> float:
        return stats.rbf_mmd2(self.reference, self.embed(x), self.bandwidth, self.kxx)

    def mmd_thresholds(self, n: int) -> tuple[float, float] | None:
        sizes = [size for size in self.null if size <= n]
        if not sizes:
            return None
        null = self.null[max(sizes)]
        return float(np.quantile(null, 0.99)), float(null.max())


def detect(ref: Reference, predicted: np.ndarray, confidence: np.ndarray, inputs: dict[str, np.ndarray],
           logits: np.ndarray, min_samples: int, features: np.ndarray | None = None) -> list[dict]:
    """One entry per quantity: {quantity, statistic, score, warn, alert, state, ...extra figures}.
    The embedding is that of `features` (N, D) when given and the profile has them, else of `logits`."""
    n = len(predicted)
    if n < min_samples:
        names = ["class_mix", "confidence", *ref.inputs, "embedding"]
        return [{"quantity": q, "statistic": None, "score": None, "state": "waiting"} for q in names]
    out = []
    counts = np.bincount(predicted, minlength=len(ref.class_names))
    score = stats.psi(ref.class_counts, counts)
    out.append({"quantity": "class_mix", "statistic": "psi", "score": score, "warn": PSI_WARN, "alert": PSI_ALERT,
                "state": _above(score, PSI_WARN, PSI_ALERT), "js_distance": stats.js_distance(ref.class_counts, counts)})
    samples = {"confidence": (ref.confidence, confidence),
               **{name: (ref.inputs[name], inputs[name]) for name in ref.inputs if name in inputs}}
    for name, (reference, live) in samples.items():
        live = live[~np.isnan(live)]  # an image whose statistics were not kept (its request timed out)
        if len(live) < min_samples:
            out.append({"quantity": name, "statistic": "ks", "score": None, "state": "waiting"})
            continue
        d, p = stats.ks(reference, live)
        state = "alert" if p < KS_ALERT_P else "warn" if p < KS_WARN_P else "ok"
        out.append({"quantity": name, "statistic": "ks", "score": d, "p_value": p, "warn": KS_WARN_P,
                    "alert": KS_ALERT_P, "state": state, "wasserstein_sd": stats.wasserstein(reference, live)})
    use_features = features is not None and ref.features_embedding is not None \
        and features.shape[1] == ref.features_embedding.mean.shape[0]
    embedding, x = (ref.features_embedding, features) if use_features else (ref.logits_embedding, logits)
    thresholds = embedding.mmd_thresholds(n)
    if thresholds is None:
        out.append({"quantity": "embedding", "statistic": "mmd2", "score": None, "state": "waiting",
                    "space": embedding.kind})
    else:
        score = embedding.mmd2(x)
        out.append({"quantity": "embedding", "statistic": "mmd2", "score": score, "warn": thresholds[0],
                    "alert": thresholds[1], "state": _above(score, *thresholds), "space": embedding.kind})
    return out


def _above(score: float, warn: float, alert: float) -> str:
    return "alert" if score > alert else "warn" if score > warn else "ok"
