"""The test score without the test images that leak from train (as ciFAIR reports CIFAR scores).

When `data inspect --embed` has audited the dataset, its leak record (data/exclusions.py) lists
the test images with a near copy in train; the same task metrics are computed once more on the
test split without them. A model that memorised its training images scores better on the leaked
ones, so the leak-free score is the honest one."""
from __future__ import annotations

import numpy as np
import torch

from cvrecipe.data.cache import cache_root
from cvrecipe.data.exclusions import read_record


def leak_free_scores(task, cache_dir: str | None, dataset: str, split: str, y: np.ndarray,
                     outputs: torch.Tensor, class_names: list[str]) -> dict | None:
    """{"leaked": test images left out, "num_images", "headline", "metrics"} or None (no audit, not
    the test split, or an audit written for a test split of another size)."""
    if split != "test":
        return None
    record = read_record(cache_root(cache_dir), dataset, len(y))
    if record is None:
        return None
    keep = np.setdiff1d(np.arange(len(y)), np.asarray(record["leaks"], np.int64))
    metrics = task.evaluate(outputs[torch.from_numpy(keep)], task.batch_targets(y[keep], 0, len(keep)), class_names)
    return {"leaked": int(len(y) - len(keep)), "num_images": int(len(keep)), "audit": record["report"],
            "headline": task.headline(metrics), "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)}}
