"""The task interface, and the parity report every task's export check fills in."""
from __future__ import annotations

from dataclasses import asdict, dataclass
import math

import numpy as np
import torch
from rich.table import Table

from cvrecipe.config import AugmentConfig
from cvrecipe.tasks.registry import answers_of, spec_of
from cvrecipe.tasks.views import View


class Meter:
    """Accumulates a task's metrics over batches. `update` only does device-side arithmetic (no
    host sync), so it can run every training step; `compute` syncs once and returns
    {metric: value} for the task's metric names (loss excluded: the caller sums the loss)."""

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class ParityReport:
    """Does an exported file give the eager model's outputs? `agreement` is the task's own measure
    (the share of images with the same top-1 class; of pixels with the same class)."""
    images: int
    batch_sizes: list[int]  # batch sizes the exported file was run at
    max_abs_diff: float  # max |exported - eager| over all outputs
    agreement: float
    atol: float
    min_agreement: float
    measure: str = "top-1 agreement"
    outputs: str = "logit"  # what max_abs_diff compares

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.agreement >= self.min_agreement

    def summary(self) -> str:
        return (f"max |{self.outputs} diff| {self.max_abs_diff:.3g} (limit {self.atol:.3g}), {self.measure} "
                f"{self.agreement:.2%} (limit {self.min_agreement:.2%}) on {self.images} images")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


class Task:
    """What differs between tasks. Subclasses set `name` and implement the methods; the sanity-check
    helpers below have a classifier's defaults (one label per item).

    Three configs meet here, under three names: `self.settings` is the task's own section of the run's
    config (segmentation: cfg.segment), `config` the whole run Config (input_size, model_meta), and
    `policy` the augmentation section (augment)."""

    name: str = ""
    section: str | None = None  # the Config section that configures the task, where it has one
    PARITY_IMAGES = 1000  # at most this many held-out images check an export
    # the sanity checks' budgets, in items (cvrecipe/train/sanity.py)
    SANITY = {"init_batch": 256, "overfit_batch": 32, "train_batch": 32, "held_out": 512}
    SANITY_SCORE = "accuracy"  # what item_scores' "how right" is called in the checks' messages
    SANITY_FROZEN_NORM = False  # the checks train with BatchNorm on its running statistics (and dropout off)
    SANITY_OVERFIT = (0.99, 0.9)  # the overfit check's (pass, warn) thresholds on the memorised batch's score

    def __init__(self, settings=None):
        self.settings = settings  # the task's own config section (Config.<section>), where it has one

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names per split, loss first (metrics.csv has train_<m> and val_<m>): the task's spec's."""
        return spec_of(self.name).METRICS

    # -- the model -----------------------------------------------------------------------------
    def input_size(self, config, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the model is built for, given the dataset's image size."""
        return image_size

    def model_kwargs(self, config) -> dict:
        """Keyword arguments every model of this task takes from the config (a classifier's dropout)."""
        return {"dropout": config.model.dropout}

    def model_meta(self, config, input_size: tuple[int, int]) -> dict:
        """Entries the task adds to the model's metadata (stored with its weights and exports)."""
        return {}

    # -- targets -------------------------------------------------------------------------------
    # Targets travel as the data source stores them ((N,) labels, (N, H, W) masks); a task whose
    # targets are ragged (boxes per image) overrides these three.
    def device_targets(self, y, device: torch.device):
        """A whole split's targets `y` on `device`, to be gathered by index tensors and sliced by batch."""
        return torch.from_numpy(np.asarray(y)).to(device)

    def batch_targets(self, y, start: int, stop: int) -> torch.Tensor:
        """Targets of items start..stop of a split's targets `y` (an array, or rows on disk), as one batch."""
        return torch.from_numpy(np.asarray(y[start:stop]))

    def count(self, targets) -> int:
        """How many items a batch of targets holds (a loss mean is over these)."""
        return len(targets)

    def shuffle_targets(self, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The targets reassigned to other items at random (the sanity checks' label-leak test)."""
        return targets[torch.randperm(len(targets), generator=gen)]

    # -- outputs -------------------------------------------------------------------------------
    def merge_batches(self, outputs: list[torch.Tensor], meta: dict) -> torch.Tensor:
        """A split's outputs from its batches' outputs, in order (no batch: an empty (0, K) tensor)."""
        return torch.cat(outputs) if outputs else torch.zeros(0, meta["num_classes"])

    def merge_views(self, outputs: list[tuple[View, torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
        """Test-time augmentation: one output from the model's outputs on each view (tasks/views.py)
        of images of `size` (H, W). Class scores need no mapping back: their weighted mean."""
        return sum(view.weight * out for view, out in outputs)

    def export_outputs(self) -> list[str]:
        """The names of an exported graph's outputs, in the order the model returns them."""
        return ["logits"]

    # -- training ------------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, x: torch.Tensor, targets):
        """The model's outputs on a training batch (a detector takes the targets too, and returns its losses)."""
        return model(x)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The mean training loss of a batch (a scalar)."""
        raise NotImplementedError

    def augment(self, x: torch.Tensor, y: torch.Tensor, policy: AugmentConfig, hflip_ok: bool, gen: torch.Generator,
                base_flip: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented (images, targets) of a training batch, drawn from `gen`."""
        raise NotImplementedError

    def meter(self, num_classes: int, device: torch.device) -> Meter:
        """A fresh accumulator of this task's metrics (loss excluded) on `device`."""
        raise NotImplementedError

    # -- evaluation ----------------------------------------------------------------------------
    def item_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per item (B,): (how right, in [0, 1]; the unreduced loss). The sanity checks compare these."""
        raise NotImplementedError

    def initial_loss(self, targets: torch.Tensor, num_classes: int, prior=None) -> float:
        """The loss expected at initialisation on `targets`: ln K for a uniform softmax, or, when the
        head's bias is set to the class prior (an (K,) array), the cross-entropy of the prior."""
        if prior is None:
            return math.log(num_classes)
        return float(-np.log(prior[targets.numpy()]).mean())

    def initial_loss_part(self, model: torch.nn.Module):
        """For a model whose initial loss is known from its construction rather than from the targets'
        classes: (part, expected), `part(outputs, targets)` the part of the train-mode outputs that is
        predicted and `expected` its value (NaN: none is derived for this model). None: the whole loss,
        expected from `initial_loss` (or from uniform outputs)."""
        return None

    def fit_score(self, model: torch.nn.Module, x: torch.Tensor, targets, outputs) -> float:
        """How well `model` fits the batch (x, targets), in [0, 1], given its training outputs on it (the
        sanity checks' overfit test): the mean item score."""
        return self.item_scores(outputs.detach(), targets)[0].mean().item()

    def chance(self, targets: torch.Tensor) -> float:
        """The accuracy of always answering the commonest class on `targets` (the sanity checks' floor)."""
        counts = torch.bincount(targets.flatten().long())
        return float(counts.max() / counts.sum()) if len(counts) else 0.0

    def score_sigma(self, scores: torch.Tensor, p: float) -> float:
        """Standard error of a mean item score near accuracy `p`: binomial, items being right or wrong."""
        return (p * (1 - p) / max(len(scores), 1)) ** 0.5

    def sanity_items(self, x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator):
        """(x, y) as the sanity checks use them (a task may cut large images into small items)."""
        return x, y

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict:
        """Everything eval.json holds for one split, from the model's outputs over the whole split."""
        raise NotImplementedError

    def headline(self, result: dict) -> str:
        """One line: the main figures of an evaluate() result."""
        raise NotImplementedError

    def table(self, result: dict) -> Table:
        """The evaluate() result as a terminal table."""
        raise NotImplementedError

    # -- export --------------------------------------------------------------------------------
    def parity(self, reference: np.ndarray, exported: np.ndarray, batch_sizes: list[int], half: bool,
               atol: float | None = None, min_agreement: float | None = None) -> ParityReport:
        """Compare an export's outputs with the eager model's on the same images."""
        raise NotImplementedError

    def answers(self, outputs: torch.Tensor, meta: dict, k: int | None = None,
                image_sizes: list[tuple[int, int]] | None = None) -> list[dict]:
        """Per image, the answer `cvrecipe predict` gives (e.g. {"top": [...]}): the task's torch-free
        answer layer (tasks/answers/), the one the server and the monitor use too. `image_sizes`: each
        image's own (H, W) before it was resized to the model's input, for a task whose answers carry
        pixel coordinates (boxes); the others do not need it. `k`: classes (or boxes) per answer, None
        for the answer layer's default."""
        return answers_of(self.name).answers(outputs.float().numpy(), meta, **given(k=k))

    # whether draw_answer draws this task's answers on an image (annotated images and videos); why not
    DRAWS_ANSWERS = False
    NOT_DRAWN = "this model's answers are not drawn on images (only answers with places in the image, boxes, are)"

    def draw_answer(self, answer: dict, image: np.ndarray, meta: dict) -> np.ndarray:
        """`image` ((H, W, 3) or (H, W) uint8, the image as given) with `answer` drawn on it, as a new
        (H, W, 3) uint8 array; only for a task with DRAWS_ANSWERS."""
        raise ValueError(self.NOT_DRAWN)

    def save_answer(self, answer: dict, image: np.ndarray, out_dir, stem: str, meta: dict,
                    overlay: bool = False) -> dict:
        """The answer as JSON-able fields, after writing any files it carries (segmentation: the mask
        PNG, and an overlay PNG when `overlay`) into `out_dir` named after `stem`."""
        return answer

    def calibration_pairs(self, outputs: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits (N, K), labels (N,)) a temperature is fitted on and its ECE measured on, from a split's
        outputs and targets; None for a task whose answers carry no calibrated probability."""
        return None

    def output_spec(self, num_classes: int) -> dict:
        """What an exported model's output is (model.json's "output")."""
        return {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes],
                "probabilities": "softmax(logits / temperature), temperature from this file's 'temperature' "
                                 "(fitted on held-out data; 1 when absent)"}

    def answer_text(self, answer: dict) -> str:
        """One answer as one line for the terminal."""
        return answers_of(self.name).text(answer)


def given(**kwargs) -> dict:
    """The keyword arguments that are not None (the others keep the callee's defaults)."""
    return {key: value for key, value in kwargs.items() if value is not None}
