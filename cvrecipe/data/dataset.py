"""Dataset types: every split is a uint8 array (N, C, H, W) plus its targets: int64 class labels
(N,) for classification, uint8 class-index masks (N, H, W) for segmentation (IGNORE = not
labelled), or ragged boxes per image (BoxTargets, box_targets.py) for detection. The images are a numpy array in memory, or a ShardedArray (shards.py) read from disk a
batch at a time when the dataset is larger than the memory budget."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cvrecipe.data.box_targets import BoxTargets
from cvrecipe.data.shards import take_rows


IGNORE = 255  # mask value of pixels without a label: no loss, no metric


class DataError(ValueError):
    """A dataset that cannot be used as asked; the message names the dataset, split or file."""


class DataWarning(UserWarning):
    """Files a dataset left out or took as they were (unreadable, stray, tiny): one line per kind,
    naming the file that lists them all. The command line prints it as `warning: ...`."""


@dataclass
class Split:
    x: np.ndarray  # (N, C, H, W) uint8 (or a ShardedArray of them)
    y: np.ndarray  # (N,) int64 class indices, (N, H, W) uint8 class-index masks, or BoxTargets
    names: list[str] | None = None  # the file of each image, where the source keeps them

    def __post_init__(self):
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise DataError(f"split images must be uint8 (N, C, H, W), got {self.x.dtype} {self.x.shape}")
        if len(self.x) != len(self.y):
            raise DataError(f"split has {len(self.x)} images but {len(self.y)} labels")
        if isinstance(self.y, BoxTargets):
            pass  # its own checks ran when it was built
        elif self.y.ndim == 3:
            if self.y.dtype != np.uint8 or self.y.shape[1:] != self.x.shape[2:]:
                raise DataError(f"split masks must be uint8 (N, H, W) matching images {self.x.shape}, got "
                                f"{self.y.dtype} {self.y.shape}")
        elif self.y.ndim == 1:
            self.y = self.y.astype(np.int64, copy=False)
        else:
            raise DataError(f"split targets must be labels (N,) or masks (N, H, W), got shape {self.y.shape}")

    @property
    def masks(self) -> bool:
        """Are the targets per-pixel masks (segmentation) rather than one label per image?"""
        return not self.boxes and self.y.ndim == 3

    @property
    def boxes(self) -> bool:
        """Are the targets boxes per image (detection)?"""
        return isinstance(self.y, BoxTargets)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> "Split":
        names = [self.names[i] for i in np.asarray(index, np.int64)] if self.names is not None else None
        return Split(take_rows(self.x, index), take_rows(self.y, index), names)


@dataclass
class ImageDataset:
    name: str
    classes: list[str]
    train: Split
    test: Split | None = None
    val: Split | None = None
    hflip_ok: bool = True  # whether mirrored images keep their label (not for digits/letters)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out while decoding
    colours: list[list[int]] | None = None  # RGB per class, for mask overlays (segmentation)

    @property
    def masks(self) -> bool:
        """Per-pixel targets (segmentation) rather than one label per image?"""
        return self.train.masks

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # (C, H, W)

    @property
    def eval_split(self) -> tuple[str, Split]:
        """The split held out for final evaluation: test when the source has one, else val."""
        if self.test is not None:
            return "test", self.test
        return "val", self.val

    def check(self) -> None:
        """Stop early, with names, on data that cannot train a classifier (or a detector)."""
        needed = 1 if self.train.boxes else 2  # a detector's boxes stand against the background: one class suffices
        if len(self.classes) < needed:
            raise DataError(f"dataset {self.name} has {len(self.classes)} class(es): {self.classes}; "
                            f"need at least {needed}")
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            if split is None or len(split) > 0:
                continue
            if split_name == "val" and self.test is not None and len(self.test):
                continue  # data.val_fraction=0: no validation, the test split still evaluates
            hint = " (data.val_fraction=0 needs a test split to evaluate on)" if split_name == "val" else ""
            raise DataError(f"dataset {self.name}: split '{split_name}' is empty{hint}")
        # labels, mask values (IGNORE among them) or the boxes' classes
        present = np.unique(self.train.y.labels if self.train.boxes else self.train.y)
        missing = [self.classes[i] for i in range(len(self.classes)) if i not in present]
        if missing:
            raise DataError(f"dataset {self.name}: classes with no training images: {missing}")


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` of every class held out (at least one per class)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_held = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of about `n` examples with the class proportions of `y` (masks: any `n`, seeded)."""
    if n >= len(y):
        return np.arange(len(y))
    _, held = holdout_split(y, n / len(y), seed)
    return held


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): stratified by class for labels; for masks and boxes (one image holds
    many classes) a seeded random `fraction` of the images, at least one."""
    if _labels(y):
        return stratified_split(y, fraction, seed)
    order = np.random.default_rng(seed).permutation(len(y))
    n_held = min(len(y) - 1, max(1, int(round(len(y) * fraction))))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _labels(y) -> bool:
    """Is `y` one class label per image (which a split can stratify by)?"""
    return not isinstance(y, BoxTargets) and y.ndim == 1


FOLD_SEED = 0  # folds do not move with train.seed: every seed of a fold sees the same images


def kfold_split(y: np.ndarray, folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out fold) of fold `fold` of `folds` seeded folds (scikit-learn's
    StratifiedKFold for labels, KFold for masks and boxes; shuffled with FOLD_SEED)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if folds > len(y):
        raise DataError(f"data.folds={folds}: only {len(y)} training images to cut into folds")
    if _labels(y):
        splitter = StratifiedKFold(folds, shuffle=True, random_state=FOLD_SEED)
        parts = list(splitter.split(np.zeros(len(y)), y))
    else:
        parts = list(KFold(folds, shuffle=True, random_state=FOLD_SEED).split(np.zeros(len(y))))
    keep, held = parts[fold]
    return np.sort(keep), np.sort(held)


def pixel_mean_std(x, chunk: int | None = None, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (C,) of (N, C, H, W) uint8 pixels (numpy or a torch tensor on any
    device, where the sums then run), in [0, 1] units.

    Float64 sums over chunks of `chunk` images (default 1,024 on a CPU, 8,192 on a GPU): memory
    stays at one chunk in float64 instead of a float copy of the whole set (600 MB for CIFAR-10's
    training split), and the sums are exact enough (255² · 10⁹ is far inside float64's 2⁵³)."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    c = x.shape[1]
    if chunk is None:  # host memory is what is short on a CPU; on a GPU, fewer launches
        chunk = 1024 if device.type == "cpu" else 8192
    total = torch.zeros(c, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(x), chunk):  # sliced before conversion: a ShardedArray reads one chunk at a time
        part = torch.as_tensor(x[start:start + chunk]).transpose(0, 1).reshape(c, -1).double()
        total += part.sum(1)
        total_sq += part.square().sum(1)
    n = len(x) * int(np.prod(x.shape[1:])) // max(c, 1)
    mean = total / max(n, 1)
    var = ((total_sq - n * mean**2) / max(n - ddof, 1)).clamp_min(0.0)
    return (mean / 255).cpu().numpy(), (var.sqrt() / 255).cpu().numpy()
