"""Sanity checks before a long run: small experiments on copies of the initial model that catch a
broken pipeline in seconds instead of after an hour of training.

  init-loss   the loss at initialisation is close to ln(K) (the prior's entropy with
              model.init_bias_prior; for a focal-loss detector, its classification term is what
              the heads' prior predicts): a far-off value means mis-scaled logits or a wrong loss
  overfit     one small batch is memorised to ~100% (accuracy; a detector's mAP@.5) within a step
              budget: catches frozen layers, a loss that ignores the labels, labels out of step
              with their images
  zero-input  a model fed zeros ends clearly worse on held-out images than one fed the images:
              catches labels unrelated to the images and inputs that never reach the model
  label-leak  labels shuffled against their images cannot be learned on a held-out batch: if
              they can, the input pipeline carries the label into the input

Every check trains its own deep copy of the model that training will start from, draws from
its own seeded generator, and the global RNG state is restored afterwards, so a run trains
identically with and without the checks. The task decides what an item is, how it is scored and
what the model is given (`Task.forward`: a detector takes its boxes too and returns its losses).
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from cvrecipe.artifact.build import build_model
from cvrecipe.config import Config
from cvrecipe.data import ImageDataset, load_dataset
from cvrecipe.device import resolve_device, seed_everything
from cvrecipe.models import ImageModel
from cvrecipe.models.head import class_prior
from cvrecipe.tasks import DEFAULT_TASK, Task, get_task
from cvrecipe.train.finetune import Finetune

# Budgets, chosen so the four checks take seconds for small-cnn on Fashion-MNIST on 2 CPU cores
# while healthy setups pass with a margin (measured, zero-input: held-out accuracy 0.48 on
# Fashion-MNIST and 0.36 on digits against ~0.11 for guessing; loss t = 4.4 for the slow-starting
# seed-cnn on CIFAR-10; shuffled-label setups score below guessing and t ≈ -1 to -4).
INIT_BATCH = 256  # images for the loss at initialisation
OVERFIT_BATCH = 32  # images to memorise
OVERFIT_STEPS = 150  # step budget for memorising them (small-cnn needs ~20-40)
TRAIN_STEPS = 25  # optimisation steps for the zero-input and label-leak models
TRAIN_BATCH = 32  # images per step for those
HELD_OUT = 512  # held-out images for the zero-input and label-leak comparisons
LR = 1e-3  # Adam: the recipe's own schedule is tuned for full epochs, not for a few dozen steps
SEED_OFFSET = 7919  # the checks' generator is seeded apart from training's (seed, epoch) streams

INIT_LOSS_WARN = 0.15  # relative deviation of the initial loss from its expected value
INIT_LOSS_FAIL = 0.5
ZERO_SIGMAS_PASS, ZERO_SIGMAS_WARN = 5.0, 2.5  # held-out accuracy above input-free guessing, binomial std
ZERO_T_PASS, ZERO_T_WARN = 4.0, 2.0  # paired t-statistic of the held-out loss advantage of the real model
LEAK_SIGMAS_WARN, LEAK_SIGMAS_FAIL = 4.0, 8.0  # held-out accuracy above chance, in binomial std

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# the input pipeline: (images, targets, gen) → images, or (images, targets) when it moves targets along
InputFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # → (right (B,), loss (B,))


class SanityCheckFailed(RuntimeError):
    """At least one sanity check failed; the message names each failure with its numbers."""

    exit_status = 2  # the command line's code for bad input: the recipe's setup, not the run, is at fault


@dataclass
class CheckResult:
    name: str
    status: str  # pass | warn | fail | skip (nothing to compare against for this model)
    message: str  # one line with the numbers behind the verdict
    values: dict


def _grade(value: float, pass_if: Callable[[float], bool], warn_if: Callable[[float], bool]) -> str:
    return "pass" if pass_if(value) else "warn" if warn_if(value) else "fail"


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore Python's, NumPy's and torch's (CPU and this CUDA device's) RNG state on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's CPU thread count set to `n` (None: unchanged) for the block, then restored."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def initial_model(cfg: Config, ds: ImageDataset) -> ImageModel:
    """The model exactly as `fit` builds it: same seed, same draws, hence the same weights, and
    frozen as its first epoch trains it (a pretrained backbone then costs forward passes only)."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg, ds)
    Finetune(model, cfg.finetune, cfg.train.epochs).on_epoch_start(0)
    return model


def training_loss(cfg: Config) -> LossFn:
    task = get_task(cfg.task, cfg)
    return lambda outputs, y: task.loss(outputs, y, cfg.train.label_smoothing)


def training_inputs(cfg: Config, ds: ImageDataset) -> InputFn:
    """The training input pipeline (the task's augmentation): (images, targets) in, (images, targets)
    out; the targets only move with their images (a segmentation mask is cropped and turned with its
    image), so a label cannot flow into the input through it."""
    task = get_task(cfg.task, cfg)
    return lambda x, y, gen: task.augment(x, y, cfg.augment, ds.hflip_ok, gen)


def _through(make_inputs: InputFn, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """(inputs, targets) from the pipeline, whichever of the two forms it returns."""
    out = make_inputs(x, y, gen)
    return out if isinstance(out, tuple) else (out, y)


def run_checks(cfg: Config, ds: ImageDataset, model: nn.Module | None = None, loss_fn: LossFn | None = None,
               make_inputs: InputFn | None = None, device: torch.device | None = None) -> list[CheckResult]:
    """All four checks on copies of `model` (default: the model `fit` would start from). Items are
    what the task makes of the images (`Task.sanity_items`: images for a classifier, small crops of
    image and mask for segmentation), scored by the task (`Task.item_scores`: for classification,
    top-1 right and cross-entropy; for segmentation, the share of pixels right and their mean
    cross-entropy), in the task's budgets (`Task.SANITY`)."""
    device = device or resolve_device(cfg.train.device)
    task = get_task(cfg.task, cfg)
    budget = {"init_batch": INIT_BATCH, "overfit_batch": OVERFIT_BATCH, "train_batch": TRAIN_BATCH,
              "held_out": HELD_OUT, **task.SANITY}
    with preserved_rng(device), cpu_threads(cfg.train.num_threads):
        model = (model if model is not None else initial_model(cfg, ds)).to(device)
        loss_fn = loss_fn or training_loss(cfg)
        make_inputs = make_inputs or training_inputs(cfg, ds)
        score = task.item_scores
        gen = torch.Generator().manual_seed(cfg.train.seed + SEED_OFFSET)
        n_pool = TRAIN_STEPS * budget["train_batch"]
        pool_x, pool_y = task.sanity_items(*_draw(ds.train.x, ds.train.y, n_pool, gen, task), n_pool, gen)
        held = ds.val if ds.val is not None and len(ds.val) else ds.train
        held_x, held_y = task.sanity_items(*_draw(held.x, held.y, budget["held_out"], gen, task),
                                           budget["held_out"], gen)
        num_classes = len(ds.classes)
        init_x, init_y = pool_x[:budget["init_batch"]], pool_y[:budget["init_batch"]]
        init_loss_fn, expected, basis = _init_loss_expectation(cfg, ds, model, init_x, init_y, loss_fn, task, device)
        train, held_out, batch = (pool_x, pool_y), (held_x, held_y), budget["train_batch"]
        overfit = budget["overfit_batch"]
        return [
            check_init_loss(model, init_x, init_y, init_loss_fn, expected, device, task, basis),
            check_overfit_batch(model, pool_x[:overfit], pool_y[:overfit], loss_fn, device, task=task),
            check_zero_input(model, train, held_out, loss_fn, make_inputs, gen, device, score, task, batch),
            check_label_leak(model, train, held_out, loss_fn, make_inputs, gen, device, score, task, batch),
            *check_test_leakage(cfg, ds),
        ]


def _draw(x: np.ndarray, y, n: int, gen: torch.Generator, task: Task | None = None) -> tuple[torch.Tensor, object]:
    """n random images (all of them, shuffled, when there are fewer) as a uint8 tensor on the CPU, with
    their targets as the task holds them there (labels and masks: int64 tensors; boxes: DeviceBoxes)."""
    task = task or get_task(DEFAULT_TASK)
    idx = torch.randperm(len(y), generator=gen)[:n].numpy()
    return torch.from_numpy(x[idx]), task.device_targets(y[idx], torch.device("cpu"))


def _init_loss_expectation(cfg: Config, ds: ImageDataset, model: nn.Module, x: torch.Tensor, y, loss_fn: LossFn,
                           task: Task, device: torch.device) -> tuple[LossFn, float, str]:
    """(what is measured at initialisation, its expected value, where that value comes from): the part
    of the loss the model's own construction predicts where the task knows one (a focal-loss
    detector's classification term), else the whole loss against the class prior's entropy or
    uniform outputs' loss."""
    known = task.initial_loss_part(model)
    if known is not None:
        return (*known, "the classification term its heads' prior predicts")
    if cfg.model.init_bias_prior:
        return loss_fn, _expected_init_loss(cfg, ds, y, len(ds.classes), task), "the class prior's entropy"
    return loss_fn, _uniform_loss(model, x, y, loss_fn, device), "uniform outputs' loss, ln K for cross-entropy"


def _expected_init_loss(cfg: Config, ds: ImageDataset, y: torch.Tensor, num_classes: int,
                        task: Task | None = None) -> float:
    """The task's expected initial loss on targets y, the head starting at the class prior when the
    config says so."""
    task = task or get_task(cfg.task, cfg)
    prior = class_prior(ds.train.y, num_classes) if cfg.model.init_bias_prior else None
    return task.initial_loss(y, num_classes, prior)


def _uniform_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, device: torch.device) -> float:
    """The loss of uniform outputs (all-zero logits) on (x, y): ln K for cross-entropy, and whatever the
    task's loss (e.g. soft Dice) gives for a uniform softmax."""
    was = model.training
    with torch.no_grad():
        shape = model.eval()(x[:1].to(device)).shape  # the outputs' shape for one item
    model.train(was)
    return float(loss_fn(torch.zeros(len(y), *shape[1:]), y))


def check_init_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, expected: float,
                    device: torch.device, task: Task | None = None, basis: str = "uniform outputs' loss") -> CheckResult:
    """Loss of the untrained model (train mode, as the first step sees it) against `expected`, which
    `basis` names (NaN: nothing to compare against for this model: skipped, saying so)."""
    task = task or get_task(DEFAULT_TASK)
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        loss = loss_fn(task.forward(model, x.to(device), y.to(device)), y.to(device)).item()
    if math.isnan(expected):
        return CheckResult("init-loss", "skip", f"loss at init {loss:.3f}; no expected value is derived for this "
                           f"model (only for focal-loss heads)", {"loss": loss, "expected": None, "deviation": None})
    deviation = abs(loss - expected) / expected if math.isfinite(loss) else math.inf
    status = _grade(deviation, lambda d: d <= INIT_LOSS_WARN, lambda d: d <= INIT_LOSS_FAIL)
    message = (f"loss at init {loss:.3f}, expected {expected:.3f} ({basis}): {deviation:.0%} off (warn above {INIT_LOSS_WARN:.0%}, fail above {INIT_LOSS_FAIL:.0%})")
    return CheckResult("init-loss", status, message, {"loss": loss, "expected": expected, "deviation": deviation})


def _optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=LR) if params else None


def _train_mode(model: nn.Module, frozen_norm: bool = False) -> nn.Module:
    """`model` in train mode with dropout off (it only slows memorisation down) and, where
    `frozen_norm`, BatchNorm on its running statistics (the task's SANITY_FROZEN_NORM)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout) or (frozen_norm and isinstance(m, nn.modules.batchnorm._BatchNorm)):
            m.eval()
    return model


def check_overfit_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                        device: torch.device, score: ScoreFn | None = None, task: Task | None = None) -> CheckResult:
    """Memorise one batch (no augmentation, dropout off); stop as soon as every image is right (the
    task's `fit_score`: a classifier's accuracy, a detector's mAP@.5; `score` overrides the item scores)."""
    task = task or get_task(DEFAULT_TASK)
    fit = task.fit_score if score is None else (lambda m, xb, yb, out: score(out.detach(), yb)[0].mean().item())
    pass_at, warn_at = task.SANITY_OVERFIT
    model = copy.deepcopy(model)
    optimizer = _optimizer(model)
    x, y = x.to(device), y.to(device)
    acc, loss, steps = 0.0, math.inf, 0
    while steps < OVERFIT_STEPS:
        _train_mode(model, task.SANITY_FROZEN_NORM)
        outputs = task.forward(model, x, y)
        loss_t = loss_fn(outputs, y)
        acc, loss = fit(model, x, y, outputs), loss_t.item()
        if acc >= pass_at or optimizer is None or not loss_t.requires_grad or not math.isfinite(loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        steps += 1
    status = _grade(acc, lambda a: a >= pass_at, lambda a: a >= warn_at)
    note = (" (the model has no trainable parameters)" if optimizer is None
            else f" (the loss became {loss})" if not math.isfinite(loss) else "")
    message = (f"{len(y)} images memorised to {acc:.0%} {task.SANITY_SCORE} (loss {loss:.3f}) after {steps} of "
               f"{OVERFIT_STEPS} steps{note}")
    return CheckResult("overfit", status, message, {"accuracy": acc, "loss": loss, "steps": steps})


def _train_copy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, make_inputs: InputFn,
                gen: torch.Generator, device: torch.device, zeros: bool = False, batch: int = TRAIN_BATCH,
                task: Task | None = None) -> nn.Module:
    """TRAIN_STEPS Adam steps of `batch` items over (x, y) through the input pipeline; `zeros` blanks
    every input."""
    task = task or get_task(DEFAULT_TASK)
    model = copy.deepcopy(model).train()
    if task.SANITY_FROZEN_NORM:
        _train_mode(model, frozen_norm=True)
    optimizer = _optimizer(model)
    for step in range(TRAIN_STEPS):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(y)
        xb, yb = x[idx].to(device), y[idx].to(device)
        inputs, yb = _through(make_inputs, xb, yb, gen)
        if zeros:
            inputs = torch.zeros_like(inputs)
        loss = loss_fn(task.forward(model, inputs, yb), yb)
        if optimizer is None or not loss.requires_grad:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _held_out(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, score: ScoreFn,
              zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (right, loss) on held-out images; the zero-input model sees zeros here too."""
    x = torch.zeros_like(x) if zeros else x
    return score(model(x.to(device)).float().cpu(), y)


def check_zero_input(model: nn.Module, train: tuple, held: tuple, loss_fn: LossFn, make_inputs: InputFn,
                     gen: torch.Generator, device: torch.device, score: ScoreFn, task: Task | None = None,
                     batch: int = TRAIN_BATCH) -> CheckResult:
    """Same steps, same batches, once with the images and once with zeros; compare on held-out images.

    Evidence that the images help, either of: held-out accuracy above the better of the zero-input
    model and the commonest class (in binomial std), or a held-out loss lower image by image than
    the zero-input model's (a paired t-statistic). Slow starters show one but not the other: an
    unnormalised net on CIFAR-10 gains only hundredths of a nat (t ≈ 4) with no accuracy yet, while
    ResNet-18 gains accuracy (+0.09) but is over-confident after so few steps (higher loss).
    `task` gives the input-free floor and the standard error of the accuracy (a classifier's items
    are right or wrong: binomial; a segmentation item's pixels are not independent: the spread of
    the per-item scores); default: classification's."""
    task = task or get_task(DEFAULT_TASK)
    real = _train_copy(model, *train, loss_fn, make_inputs, gen, device, batch=batch, task=task)
    blind = _train_copy(model, *train, loss_fn, make_inputs, gen, device, zeros=True, batch=batch, task=task)
    (real_ok, real_loss) = _held_out(real, *held, device, score)
    (zero_ok, zero_loss) = _held_out(blind, *held, device, score, zeros=True)
    y = held[1]
    baseline = max(zero_ok.mean().item(), task.chance(y))  # best input-free accuracy
    acc_sigmas = (real_ok.mean().item() - baseline) / max(task.score_sigma(real_ok, baseline), 1e-12)
    diff = zero_loss - real_loss  # > 0 where the images helped
    t = (diff.mean() / (diff.std() / math.sqrt(len(diff))).clamp_min(1e-12)).item()
    if acc_sigmas >= ZERO_SIGMAS_PASS or t >= ZERO_T_PASS:
        status = "pass"
    else:
        status = "warn" if acc_sigmas >= ZERO_SIGMAS_WARN or t >= ZERO_T_WARN else "fail"
    message = (f"after {TRAIN_STEPS} steps, held-out {task.SANITY_SCORE} with images {real_ok.mean():.3f} (loss "
               f"{real_loss.mean():.3f}) vs with zeros {zero_ok.mean():.3f} (loss {zero_loss.mean():.3f}): "
               f"{task.SANITY_SCORE} {acc_sigmas:+.1f} std above input-free guessing, loss advantage t = {t:+.1f} "
               f"(pass: {ZERO_SIGMAS_PASS:.0f} std or t {ZERO_T_PASS:.0f}; fail: below {ZERO_SIGMAS_WARN} std "
               f"and t {ZERO_T_WARN:.0f})")
    return CheckResult("zero-input", status, message, {
        "real_accuracy": real_ok.mean().item(), "zero_accuracy": zero_ok.mean().item(), "baseline": baseline,
        "accuracy_sigmas": acc_sigmas, "real_loss": real_loss.mean().item(), "zero_loss": zero_loss.mean().item(),
        "loss_t": t})


def check_label_leak(model: nn.Module, train: tuple, held: tuple, loss_fn: LossFn, make_inputs: InputFn,
                     gen: torch.Generator, device: torch.device, score: ScoreFn, task: Task | None = None,
                     batch: int = TRAIN_BATCH) -> CheckResult:
    """Train on labels shuffled against their images; held-out accuracy on shuffled labels must stay
    at chance unless the pipeline puts the label into the input. Held-out inputs go through the
    same pipeline (with their own shuffled labels), so a leak there shows too. For segmentation the
    masks are shuffled against the images (chance: always answering the commonest class)."""
    task = task or get_task(DEFAULT_TASK)
    (x, y), (hx, hy) = train, held
    y_shuffled, hy_shuffled = task.shuffle_targets(y, gen), task.shuffle_targets(hy, gen)
    trained = _train_copy(model, x, y_shuffled, loss_fn, make_inputs, gen, device, batch=batch, task=task)
    with torch.no_grad():
        inputs, hy_moved = _through(make_inputs, hx.to(device), hy_shuffled.to(device), gen)
    right = _held_out(trained, inputs.cpu(), hy_moved.to("cpu"), device, score)[0]
    acc = right.mean().item()
    chance = task.chance(hy_shuffled)  # always answering the commonest class
    sigma = max(task.score_sigma(right, chance), 1e-12)
    excess = (acc - chance) / sigma
    status = _grade(excess, lambda e: e <= LEAK_SIGMAS_WARN, lambda e: e <= LEAK_SIGMAS_FAIL)
    message = (f"held-out {task.SANITY_SCORE} on shuffled labels {acc:.3f} vs chance {chance:.3f}: {excess:+.1f} std "
               f"(warn above {LEAK_SIGMAS_WARN:.0f}, fail above {LEAK_SIGMAS_FAIL:.0f})")
    return CheckResult("label-leak", status, message, {"accuracy": acc, "chance": chance, "sigmas": excess})


def check_test_leakage(cfg: Config, ds: ImageDataset) -> list[CheckResult]:
    """test-leak: from the data audit's leak record (`data inspect --embed`), the share of test
    images with a near copy in train; warns above LEAK_WARN. No record, no check."""
    from cvrecipe.data.cache import cache_root
    from cvrecipe.data.exclusions import LEAK_WARN, read_record

    if ds.test is None:
        return []
    record = read_record(cache_root(cfg.data.cache_dir), cfg.data.name, len(ds.test))
    if record is None:
        return []
    share = len(record["leaks"]) / max(len(ds.test), 1)
    status = "warn" if share > LEAK_WARN else "pass"
    return [CheckResult("test-leak", status, f"{len(record['leaks'])} of {len(ds.test)} test images ({share:.1%}) "
                        f"have a near copy in train (warn above {LEAK_WARN:.0%}); `eval` also scores without them",
                        {"leaked": len(record["leaks"]), "share": share, "audit": record["report"]})]


STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def print_checks(results: list[CheckResult], console: Console, seconds: float | None = None) -> None:
    took = f" ({seconds:.1f}s)" if seconds is not None else ""
    table = Table(title=f"sanity checks{took}", title_justify="left")
    for col in ("check", "result", "numbers"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, f"[{STYLE[r.status]}]{r.status}[/]", r.message)
    console.print(table)


def check_before_training(cfg: Config, ds: ImageDataset, console: Console) -> list[dict]:
    """Run, print and gate: a fail raises SanityCheckFailed. Returns the results as plain dicts."""
    if not cfg.train.sanity:
        return []
    t0 = time.perf_counter()
    results = run_checks(cfg, ds)
    print_checks(results, console, time.perf_counter() - t0)
    failed = [r for r in results if r.status == "fail"]
    if failed:
        lines = "; ".join(f"{r.name}: {r.message}" for r in failed)
        # the advice first: a long line of findings is shortened at its end
        raise SanityCheckFailed(f"sanity check(s) failed ({', '.join(r.name for r in failed)}), training not "
                                f"started; fix the setup, or train anyway with --no-sanity (train.sanity=false) — "
                                f"{lines}")
    return [asdict(r) for r in results]


def doctor(cfg: Config, console: Console) -> list[CheckResult]:
    """`cvrecipe doctor`: load the recipe's data, run the checks, print them (nothing is trained)."""
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    console.print(f"data: {ds.name}  train {len(ds.train)}  val {len(ds.val)}  classes {len(ds.classes)}  "
                  f"image {ds.image_shape}  model: {cfg.model.name}")
    t0 = time.perf_counter()
    results = run_checks(cfg, ds)
    print_checks(results, console, time.perf_counter() - t0)
    return results
