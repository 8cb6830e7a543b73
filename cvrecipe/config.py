"""Typed configuration: one dataclass tree, loaded from YAML, overridden with dotted keys, checked whole.

A recipe is a YAML file whose keys mirror the dataclasses below. Every field is declared with
`option(default, doc, rules)`: its doc is what `cvrecipe config` prints, its rules (bounds, a
pattern) and its type (a `Literal` for every choice) are checked when the config is loaded, before
any data is read. Unknown keys, wrong types, values out of range and combinations that cannot work
are a `ConfigError` of one line that names the key, the value and what is allowed.

This module imports no torch: a bad recipe is refused in a fraction of a second.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.resources
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


def option(default: Any, doc: str, **rules: Any) -> Any:
    """A config field: its default, its one-line doc, and rules checked at load time:
    ge/gt/le/lt (numeric bounds), pattern (a regular expression a string must match), length (of a
    list), metric=True (the name of a metric some task produces; check_rules narrows it to the task's)."""
    metadata = {"doc": doc, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# The task registry (cvrecipe.tasks) sits above config in the layering and names the tasks, their
# metrics and the config rules each understands. It imports no torch and nothing from config when
# loaded, so config reads it at check time, by name, as a plug-in.
TASK_REGISTRY = "cvrecipe.tasks"


def _tasks():
    return importlib.import_module(TASK_REGISTRY)


@dataclass
class DataConfig:
    name: str = option("fashion-mnist", "dataset: a registered name (fashion-mnist, mnist, cifar10, cifar100, "
                                        "digits), folder:PATH (a directory or a .tar/.tar.gz/.zip archive of "
                                        "split/class/image), masks:PATH (image/ + label/ or mask/ pairs, for "
                                        "segmentation) or boxes:PATH (COCO JSON, YOLO txt or Pascal VOC XML, "
                                        "for detection; needs data.image_size), synth-detect[:BACKGROUNDS] (the seeded "
                                        "synthetic detection set, written into the cache on first use); a relative PATH is looked for in the current "
                                        "directory, then $CVRECIPE_DATA, then the source checkout (`cvrecipe "
                                        "config --explain paths`)")
    image_size: int | None = option(None, "resize every image to this square size in pixels; null keeps the "
                                          "native size", ge=1)
    channels: Literal[1, 3] | None = option(None, "1 (grayscale) or 3 (RGB); null decides from the data")
    val_fraction: float = option(0.1, "share of train held out (stratified, seeded) as validation when the source "
                                      "has no val split; 0 = none: every training image trains and the last "
                                      "epoch's weights are kept", ge=0, lt=1)
    folds: int = option(0, "K-fold cross-validation: cut the training images into K seeded folds and hold out "
                           "fold data.fold as the val split (instead of data.val_fraction); 0 = off", ge=0)
    fold: int = option(0, "which of the data.folds folds is held out as val (0-based)", ge=0)
    subset: int | None = option(None, "train on only this many training images (stratified); for quick runs", ge=1)
    exclude: str | None = option(None, "a file of image ids to train without (one per line, as `data inspect "
                                       "--embed` writes into exclude.txt: file names, or SPLIT:INDEX); the "
                                       "test split is never changed")
    normalize: bool = option(True, "standardise inputs with the training set's per-channel mean/std (inside "
                                   "the model, so export and serving do the same)")
    hflip_ok: bool | None = option(None, "may images be mirrored left-right and keep their label? null asks the "
                                         "dataset (no for digits and letters)")
    mask_classes: str | None = option(None, "masks:PATH only: a YAML file naming the classes (and their colours and "
                                            "mask values), relative to the recipe that names it; null = classes.yaml "
                                            "in the data, or PATH's stem + .yaml beside it, else the mask "
                                            "values themselves")
    cache_dir: str | None = option(None, "where decoded uint8 arrays are kept; null = $CVRECIPE_CACHE or "
                                         "~/.cache/cvrecipe")
    memory_gb: float | None = option(None, "GiB the dataset may take in memory (on a GPU: on the device); a larger "
                                           "one is streamed from the cache's shards on disk. null = half of the "
                                           "memory free when the run starts", gt=0)
    prefetch: int = option(4, "streamed data: batches read ahead while the current step runs", ge=1)
    read_threads: int = option(2, "streamed data: threads reading batches from the shards", ge=1)
    max_pixels: int = option(40_000_000, "image files whose header declares more pixels (width x height) than this "
                                         "are skipped unread (decompression bombs); also `predict`'s limit for the "
                                         "run. PIL refuses non-JPEG files above ~179 Mpx in any case", ge=1)


@dataclass
class AugmentConfig:
    hflip: bool = option(False, "random horizontal flips (only where the dataset allows mirroring)")
    flip_mode: Literal["random", "alternate"] = option(
        "random", "random: a coin per image per epoch | alternate: a coin per image per run, then flipped every "
                  "other epoch, so each image is seen both ways in any two epochs")
    crop_padding: int = option(0, "random crop after this many pixels of padding on each side (a translation); "
                                  "0 = off", ge=0)
    pad_mode: Literal["reflect", "constant"] = option("reflect", "padding for the random crop: reflect the image, "
                                                                 "or zeros (a black background)")
    cutout: int = option(0, "side in pixels of one zeroed square per image; 0 = off", ge=0)
    # segmentation: applied to image and mask together (cvrecipe/data/augment_pairs.py)
    vflip: bool = option(False, "segmentation: random vertical flips of image and mask")
    rot90: bool = option(False, "segmentation: random rotations of image and mask by 0, 90, 180 or 270 degrees")
    crop_size: int | None = option(None, "segmentation: train on random square crops of this side in pixels (the "
                                         "model's input size; larger images are segmented in overlapping tiles of "
                                         "it); null = whole images", ge=8)
    scale: list[float] = option([1.0, 1.0], "segmentation: range of a random zoom factor per image (before the "
                                            "crop; bilinear for images, nearest for masks); [1, 1] = off",
                                length=2, gt=0)
    elastic_sigma: float = option(0.0, "segmentation: std in pixels of the random displacements of an elastic "
                                       "deformation (the U-Net paper: 10 on a 3x3 grid); 0 = off", ge=0)
    elastic_grid: int = option(3, "segmentation: control points per side of the elastic deformation's coarse "
                                  "grid (displacements are interpolated bicubically between them)", ge=2)


@dataclass
class SegmentConfig:
    loss: Literal["ce", "dice", "ce+dice"] = option(
        "ce", "segmentation loss: pixel cross-entropy | soft Dice (mean over classes) | their sum; pixels "
              "labelled 255 are ignored by all three")
    tile_overlap: float = option(0.5, "sliding-window inference: share of a tile that overlaps its neighbour; "
                                      "tiles are blended with Gaussian weights, so no seams show", ge=0, lt=1)
    tile_batch: int = option(8, "sliding-window inference: tiles per forward pass", ge=1)


@dataclass
class ModelConfig:
    name: str = option("small-cnn", "a registered model (`cvrecipe models` lists them)")
    dropout: float = option(0.0, "dropout before the classifier, where the model has one", ge=0, lt=1)
    kwargs: dict = option({}, "extra keyword arguments for the model's constructor (see its docstring)")
    init_bias_prior: bool = option(False, "start the last layer's bias at log(class prior), so the loss at "
                                          "initialisation is the prior's entropy: for imbalanced data")


@dataclass
class TrainConfig:
    epochs: int = option(10, "passes over the training set (the most, with early stopping)", ge=1)
    budget_s: float | None = option(None, "stop training once this process has used this many CPU seconds since "
                                          "fit() began (time.process_time: all its threads, so 5 minutes on 2 busy "
                                          "cores is 600), at the end of the step that crosses it; that epoch is "
                                          "then validated and checkpointed as the last. null = train.epochs decides "
                                          "alone. CPU time, not wall time, so a budget means the same work on a "
                                          "shared, loaded machine", gt=0)
    repeat: int = option(1, "an epoch passes this many times over the training images, each time with new "
                            "augmentation draws: for a few large images trained on crops, so that validation and "
                            "checkpoints come every few hundred crops rather than every few", ge=1)
    batch_size: int = option(128, "images per optimisation step", ge=1)
    seed: int = option(0, "seeds the weights, the data order and the augmentation", ge=0)
    device: str = option("auto", "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N",
                         pattern=r"auto|cpu|cuda(:\d+)?")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU. bf16 also pays on "
                "CPUs with native bf16 (2x on an EPYC with avx512_bf16), costs elsewhere")
    channels_last: bool = option(True, "channels-last memory format for conv nets: faster on CPU and GPU here")
    half_weights: bool = option(False, "keep weights and activations in the half dtype of train.precision (fp16 or "
                                       "bf16), BatchNorm in fp32, instead of autocasting each op (airbench's "
                                       "layout); see optim.master_weights")
    compile: bool = option(False, "torch.compile the model; measured no faster for the speedrun net (2.49 vs "
                                  "2.50 s on an H200, slower on 2 CPU cores), useful for larger nets")
    deterministic: bool = option(False, "deterministic kernels only; a resumed CPU run is then bit-identical")
    num_threads: int | None = option(None, "torch CPU threads; null = torch's default (one per core)", ge=1)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", ge=0, lt=1)
    grad_clip: float | None = option(None, "clip the global gradient norm to this; null = off", gt=0)
    log_every: int = option(20, "steps between progress updates and NaN checks (each costs a device sync)", ge=1)
    sanity: bool = option(True, "run the sanity checks (`cvrecipe doctor`) before training; a fail stops the run")
    nproc: int = option(1, "data-parallel processes `cvrecipe train` starts on this machine through torchrun's "
                           "launcher (one per GPU); ignored in processes torchrun started itself", ge=1)
    grad_accum: int = option(1, "micro-batches per optimisation step in each process: train.batch_size stays the "
                                "global batch, split over nproc x grad_accum micro-batches", ge=1)
    sync_bn: bool = option(False, "with several processes, BatchNorm statistics over the global batch "
                                  "(SyncBatchNorm) instead of each process's share")
    rank_timeout_s: float = option(600.0, "with several processes, seconds a process waits for the others at a "
                                          "collective before the job stops with an error (a rank died or hangs)",
                                   gt=0)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw", "muon"] = option(
        "sgd", "sgd (Nesterov momentum) | adam | adamw | muon (orthogonalised updates for conv filters, "
               "Nesterov SGD for the rest)")
    lr: float = option(0.05, "peak learning rate (in optim.units)", gt=0)
    momentum: float = option(0.9, "SGD momentum, or Adam's beta1", ge=0, lt=1)
    weight_decay: float = option(5e-4, "L2 (sgd, adam) or decoupled (adamw) weight decay, on conv/linear weights "
                                       "only; in per1024 units the share of each weight removed per 1024 examples",
                                 ge=0)
    units: Literal["batch", "per1024"] = option(
        "batch", "batch: lr and weight_decay as torch takes them | per1024: per 1024 examples of summed loss, so "
                 "the per-example step does not change with the batch size (the speedrun convention)")
    norm_lr_scale: float = option(1.0, "lr multiplier for the parameters of normalisation layers (64 in the "
                                       "speedrun recipes); they get no weight decay", gt=0)
    head_lr_scale: float = option(1.0, "lr multiplier for the classifier head (the last linear layer)", gt=0)
    bias_lr_scale: float = option(1.0, "lr multiplier for biases outside normalisation layers and the head (in "
                                       "the speedrun net: the whitening layer's bias)", gt=0)
    master_weights: bool = option(True, "with train.half_weights: the optimizer updates fp32 copies of the half "
                                        "weights and writes them back after each step; false updates the half "
                                        "weights directly (cheaper; small updates may round away)")
    muon_lr: float = option(0.24, "muon: lr of the orthogonalised conv-filter updates", gt=0)
    muon_momentum: float = option(0.6, "muon: momentum of the conv-filter updates", ge=0, lt=1)
    muon_ns_steps: int = option(5, "muon: Newton-Schulz iterations per update (airbench94_muon: 3)", ge=1)
    muon_normalize: bool = option(False, "muon: rescale each filter bank to Frobenius norm sqrt(out channels) "
                                         "before its update, so the step size is relative (airbench94_muon)")


@dataclass
class ScheduleConfig:
    name: Literal["onecycle", "cosine", "constant", "triangular"] = option(
        "onecycle", "learning-rate schedule over the run: onecycle (linear rise, cosine fall) | cosine | constant "
                    "| triangular (linear up, linear down: the speedrun recipes)")
    warmup_epochs: float = option(0.0, "cosine, constant: linear warm-up length in epochs (fractions allowed)", ge=0)
    peak_at: float = option(0.25, "onecycle, triangular: share of the steps spent rising to the peak (triangular: "
                                  "0 starts at the peak and only decays)", ge=0, lt=1)
    ends: list[float] = option([0.2, 0.07], "triangular: lr factor at the first and the last step", length=2, ge=0)
    bias_end_epochs: float | None = option(None, "biases outside normalisation layers and the head decay "
                                                 "linearly from their peak lr to 0 by this epoch, then stay put "
                                                 "(airbench94_muon's whitening bias: 3); null = the run's schedule",
                                           gt=0)


@dataclass
class AverageConfig:
    name: Literal["none", "ema", "lookahead"] = option(
        "none", "weight averaging: none | ema: evaluate and save an average of the weights | lookahead: also "
                "pull the weights back to the average at every update")
    decay: float = option(0.774, "the average's decay at the end of training (0.95**5), ramped up as "
                                 "progress**3 so early weights are forgotten", ge=0, lt=1)
    every: int = option(5, "optimisation steps between updates of the average", ge=1)


@dataclass
class CheckpointConfig:
    monitor: str = option("val_loss", "metric that picks best.safetensors and drives early stopping: "
                                      "train_<m> or val_<m> for a metric m the task produces", metric=True)
    mode: Literal["auto", "min", "max"] = option("auto", "direction in which `monitor` improves; auto = min for "
                                                         "a loss, max otherwise")
    every_s: float = option(0.0, "write last.ckpt (and, without a val split, best.safetensors) once this many "
                                 "seconds have passed since the last write, and after the last epoch; 0 = every "
                                 "epoch. A resume restarts from the last write", ge=0)


@dataclass
class StopConfig:
    early: bool = option(False, "stop when checkpoint.monitor has not improved for `patience` epochs")
    patience: int = option(10, "epochs without improvement before stopping", ge=1)
    min_delta: float = option(0.0, "smallest change of the monitored metric that counts as an improvement", ge=0)


@dataclass
class EvalConfig:
    tta: Literal[0, 1, 2] = option(0, "test-time augmentation: 0 off | 1 image + mirror | 2 also 1-pixel shifts "
                                      "(6 views); mirrored views only for models trained on mirrored images")


@dataclass
class FinetuneConfig:
    strategy: Literal["none", "linear", "full", "two-stage", "lora"] = option(
        "none", "none (everything trains as usual) | linear (head only) | full | two-stage (head, then all) | "
                "lora (low-rank adapters + head); needs a pretrained model")
    freeze_epochs: int = option(0, "two-stage: epochs training only the new head before the backbone unfreezes",
                                ge=0)
    backbone_lr_scale: float = option(0.1, "lr of the backbone's last layer, x optim.lr (the head gets 1x)", gt=0)
    layer_decay: float = option(1.0, "each earlier backbone layer's lr is this x the next one's (1 = no decay)",
                                gt=0, le=1)
    freeze_layers: int = option(0, "full/two-stage/lora: this many backbone layers, from the input, never train",
                                ge=0)
    bn_eval: bool = option(False, "full/two-stage: BatchNorm keeps its pretrained statistics while its scale and "
                                  "shift train (steadier on small data)")
    feature_cache: bool = option(False, "linear: compute the backbone's features once and train the head on them")
    lora_rank: int = option(8, "lora: rank r of each adapter (A: r x in, B: out x r)", ge=1)
    lora_alpha: float = option(16.0, "lora: the adapter's output is scaled by alpha / r", gt=0)


@dataclass
class TrackConfig:
    mlflow: bool = option(False, "log parameters, per-epoch metrics, the model and the report to MLflow")
    mlflow_uri: str | None = option(None, "MLflow tracking URI; null = sqlite:///mlflow.db in the working directory")
    experiment: str = option("cvrecipe", "MLflow experiment name (created on first use)")


@dataclass
class Config:
    name: str = option("run", "run name: the folder under runs_dir (-2, -3, ... when taken)",
                       pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*")
    runs_dir: str = option("runs", "parent folder of the run folders")
    task: str | None = option(None, "what the model predicts: a registered task (cvrecipe/tasks: classification, "
                                    "a class per image; segmentation, a class per pixel; detection, boxes with a "
                                    "class each); null = classification")
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def monitor_mode(self) -> str:
        """checkpoint.mode with auto resolved: min for a loss, max for anything else."""
        if self.checkpoint.mode != "auto":
            return self.checkpoint.mode
        return "min" if self.checkpoint.monitor.endswith("loss") else "max"


# Keys of earlier versions → where they live now (None: removed, with the reason).
MOVED: dict[str, str | None] = {
    "train.optimizer": "optim.name", "train.lr": "optim.lr", "train.momentum": "optim.momentum",
    "train.weight_decay": "optim.weight_decay", "train.units": "optim.units",
    "train.bias_lr_scale": "optim.norm_lr_scale", "train.muon_lr": "optim.muon_lr",
    "train.muon_momentum": "optim.muon_momentum", "train.schedule": "schedule.name",
    "train.warmup_epochs": "schedule.warmup_epochs", "train.onecycle_pct": "schedule.peak_at",
    "train.triangle_ends": "schedule.ends", "train.ema": "average.name", "train.ema_decay": "average.decay",
    "train.ema_every": "average.every", "train.monitor": "checkpoint.monitor", "train.mode": "checkpoint.mode",
    "train.checkpoint_every_s": "checkpoint.every_s", "train.early_stopping": "stop.early",
    "train.patience": "stop.patience", "train.min_delta": "stop.min_delta",
    "train.bn_recalibrate": None,
}
REMOVED_WHY = {"train.bn_recalibrate": "removed: recomputing BatchNorm statistics after training measured "
                                      "+0.02 +- 0.09 points over 10 seeds (docs/speedrun.md)"}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key, type and rule; then, at the top,
    the rules across fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in MOVED:
            raise ConfigError(_moved_message(path, value))
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}' (valid here: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, prefix=f"{path}.")
        else:
            kwargs[key] = check_value(path, value, hint, fields[key].metadata)
    cfg = cls(**kwargs)
    if cls is Config:
        check_rules(cfg)
    return cfg


def _moved_message(path: str, value: Any) -> str:
    new = MOVED[path]
    if new is None:
        return f"config key '{path}' is {REMOVED_WHY[path]}"
    text = f"config key '{path}' is now '{new}'"
    try:
        check_value(new, value, *_field_of(new))
    except ConfigError as err:
        return f"{text}; and there {err}"
    return f"{text}: write {new}={_show(value)}"


def _field_of(key: str) -> tuple[Any, dict]:
    """(type hint, metadata) of a dotted key of Config."""
    cls, hint, meta = Config, Config, {}
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{key}'")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key '{key}' (valid in this section: {', '.join(fields)})")
        hint, meta = typing.get_type_hints(cls)[part], fields[part].metadata
        cls = hint
    return hint, meta


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _options(hint: Any) -> tuple:
    """The alternatives of a union type (X | None, Optional[Literal[...]]), or the type itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def allowed(hint: Any, meta: dict | None = None) -> str:
    """What a field accepts, in words: 'one of a, b, c', 'a number >= 0 and < 1', ..., 'or null'."""
    meta = meta or {}
    if meta.get("metric"):
        names = _tasks().task_names()
        return "one of " + ", ".join(dict.fromkeys(m for task in names for m in produced_metrics(task)))
    bounds = " and ".join(f"{sign} {meta[k]}" for k, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                          if k in meta)
    words, nullable = [], False
    for option_ in _options(hint):
        origin = typing.get_origin(option_) or option_
        if option_ is type(None):
            nullable = True
        elif origin is Literal:
            words.append("one of " + ", ".join(str(v) for v in typing.get_args(option_)))
        elif "length" in meta:  # a list of numbers
            words.append(f"a list of {meta['length']} numbers" + (f", each {bounds}" if bounds else ""))
        else:
            word = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
                    list: "a list", dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))
            if origin in (float, int) and bounds:
                word += f" {bounds}"
            if origin is str and "pattern" in meta:
                word += f" matching {meta['pattern']}"
            words.append(word)
    return " or ".join(words) + (", or null" if nullable else "")


def check_value(path: str, value: Any, hint: Any, meta: dict | None = None) -> Any:
    """`value` converted to `hint` (ints are accepted where floats are expected), or a ConfigError
    naming the key, the value and what is allowed."""
    meta = meta or {}
    options = _options(hint)
    bad = ConfigError(f"{path}={_show(value)}: expected {allowed(hint, meta)}")
    if value is None:
        if type(None) in options:
            return None
        raise bad
    for option_ in options:
        converted = _convert(value, option_)
        if converted is not _NO:
            if not _within(converted, meta):
                raise bad
            return converted
    raise bad


_NO = object()


def _convert(value: Any, option_: Any) -> Any:
    """`value` as `option_` (a type, a Literal or list[float]), or _NO."""
    if option_ is type(None):
        return _NO
    if typing.get_origin(option_) is Literal:
        return value if value in typing.get_args(option_) and type(value) is not bool else _NO
    origin = typing.get_origin(option_) or option_
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is float and numeric:
        return float(value)
    if origin is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(option_) or (Any,)
        if item is float:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return _NO
            return [float(v) for v in value]
        return value
    if origin in (str, bool, dict) and isinstance(value, origin):
        return value
    return _NO


def _within(value: Any, meta: dict) -> bool:
    if "length" in meta and len(value) != meta["length"]:
        return False
    if meta.get("metric") and not any(value in produced_metrics(task) for task in _tasks().task_names()):
        return False
    if "pattern" in meta and isinstance(value, str) and not re.fullmatch(meta["pattern"], value):
        return False
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if ("ge" in meta and not v >= meta["ge"]) or ("gt" in meta and not v > meta["gt"]) \
                or ("le" in meta and not v <= meta["le"]) or ("lt" in meta and not v < meta["lt"]):
            return False
    return True


def produced_metrics(task: str) -> list[str]:
    """The per-epoch metrics a run of `task` writes to metrics.csv (and may monitor)."""
    return [f"{split}_{m}" for split in ("train", "val") for m in _tasks().spec_of(task).METRICS]


def check_rules(cfg: Config) -> None:
    """Rules across fields; each failure names the keys and values involved. A null task becomes the
    registry's default; the task's own rules are its spec's check_config."""
    tasks = _tasks()
    cfg.task = cfg.task or tasks.DEFAULT_TASK
    if cfg.task not in tasks.TASKS:
        raise ConfigError(f"task={cfg.task}: expected one of {', '.join(tasks.task_names())}")
    metrics = produced_metrics(cfg.task)
    if cfg.checkpoint.monitor not in metrics:
        raise ConfigError(f"checkpoint.monitor={cfg.checkpoint.monitor}: expected one of {', '.join(metrics)} "
                          f"(what a {cfg.task} run produces)")
    if cfg.stop.early and cfg.checkpoint.monitor.startswith("val_") and cfg.data.val_fraction == 0 \
            and not cfg.data.folds and source_has_val(cfg.data.name) is False:
        raise ConfigError(f"stop.early=true on checkpoint.monitor={cfg.checkpoint.monitor} needs a validation split, "
                          f"and data.val_fraction=0 on {cfg.data.name}, which has none: set data.val_fraction > 0, "
                          f"or monitor a train_ metric")
    _check_folds(cfg)
    tasks.spec_of(cfg.task).check_config(cfg)
    tc = cfg.train
    if tc.batch_size % (tc.nproc * tc.grad_accum):
        raise ConfigError(f"train.batch_size={tc.batch_size} does not split into train.nproc={tc.nproc} x "
                          f"train.grad_accum={tc.grad_accum} equal micro-batches; make it a multiple of "
                          f"{tc.nproc * tc.grad_accum}")
    ft = cfg.finetune
    if ft.strategy == "two-stage" and not 0 < ft.freeze_epochs < cfg.train.epochs:
        raise ConfigError(f"finetune.freeze_epochs={ft.freeze_epochs}: two-stage needs 1 to train.epochs - 1 "
                          f"({cfg.train.epochs - 1}) head-only epochs")
    if cfg.train.half_weights and cfg.train.precision not in ("fp16", "bf16"):
        raise ConfigError(f"train.half_weights=true needs train.precision fp16 or bf16 (got {cfg.train.precision}): "
                          f"the dtype the weights are kept in")
    if cfg.train.half_weights and not cfg.optim.master_weights and cfg.train.precision != "bf16":
        raise ConfigError("optim.master_weights=false with train.half_weights needs train.precision=bf16: fp16 "
                          "gradients of a mean loss underflow without the loss scaler that master weights allow")
    if cfg.schedule.name == "onecycle" and cfg.schedule.peak_at == 0:
        raise ConfigError("schedule.peak_at=0 is for schedule.name=triangular; onecycle needs a rise (> 0)")
    if ft.feature_cache and ft.strategy != "linear":
        raise ConfigError(f"finetune.feature_cache=true needs finetune.strategy=linear (got {ft.strategy}): "
                          f"features can only be cached from a frozen backbone")


def _check_folds(cfg: Config) -> None:
    data = cfg.data
    if data.folds == 1:
        raise ConfigError("data.folds=1: cross-validation needs at least 2 folds (0 = off)")
    if data.folds and data.fold >= data.folds:
        raise ConfigError(f"data.fold={data.fold}: expected 0 to data.folds - 1 ({data.folds - 1})")
    if not data.folds and data.fold:
        raise ConfigError(f"data.fold={data.fold} needs data.folds (the number of folds) >= 2")


def source_has_val(name: str) -> bool | None:
    """Does the data source bring its own val split? Registered datasets do not; for folder:PATH a
    directory is looked at (a val/ folder, also under one wrapping folder); an archive is not
    opened here (None: unknown until the data is loaded)."""
    prefix = next((p for p in ("folder:", "masks:", "boxes:") if name.startswith(p)), None)
    if prefix is None:
        return False
    path = Path(name[len(prefix):]).expanduser()
    if not path.is_dir():
        return None
    return (path / "val").is_dir() or any((p / "val").is_dir() and (p / "train").is_dir()
                                          for p in path.iterdir() if p.is_dir())


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({err.problem})") from err
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; on a command line it means a number
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe (a path or a shipped recipe's name) plus overrides into a checked Config."""
    raw = read_recipe(recipe) if recipe is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw)


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run folder was trained with (config.yaml); keys an earlier version
    wrote are carried to their new places."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from err
    return from_dict(migrate(raw if isinstance(raw, dict) else {"config": raw}))


def yaml_error(path: Path, err: yaml.YAMLError) -> ConfigError:
    """One line naming the file, the line and the problem; a tag that would build a Python object
    (!!python/object/apply:os.system ...) is refused as such, never constructed."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.constructor.ConstructorError):
        return ConfigError(f"{path}: not a cvrecipe config (refused: {problem}{where}; configs are plain YAML "
                           f"with no tags)")
    return ConfigError(f"{path} is not valid YAML: {problem}{where}")


def migrate(raw: dict) -> dict:
    """A config dict with the keys of earlier versions moved to where they live now (removed keys
    dropped). For config files cvrecipe wrote itself; a user's recipe gets an error instead."""
    raw = copy.deepcopy(raw)
    for old, new in MOVED.items():
        section, key = old.split(".")
        if key not in (raw.get(section) or {}):
            continue
        value = raw[section].pop(key)
        if new is not None:
            new_section, new_key = new.split(".")
            raw.setdefault(new_section, {})[new_key] = value
    return raw


def read_recipe(recipe: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A recipe's YAML as a dict, with `extends: OTHER` resolved: OTHER's settings, then this
    file's on top (sections merged key by key), so a variant states only what it changes."""
    path = resolve_recipe(recipe).resolve()
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"recipe {path}: 'extends' forms a loop ({loop})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top, got {type(raw).__name__}")
    raw.pop("description", None)  # the line `cvrecipe recipes` shows; not a setting (and not inherited)
    _anchor_file_paths(raw, path.parent)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: 'extends' expects a recipe name or path, got {base!r}")
    # a relative path is relative to the extending file; a bare name is a shipped recipe
    base_path = path.parent / base
    return _merge(read_recipe(base_path if base_path.is_file() else base, (*chain, path)), raw)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


# The shipped recipes are package data (cvrecipe/recipes/), found through importlib.resources: the
# same folder in a source checkout and in an installed wheel.
RECIPES_DIR = Path(str(importlib.resources.files("cvrecipe").joinpath("recipes")))
SPACES_DIR = RECIPES_DIR / "spaces"

# How paths inside a recipe resolve, whichever directory cvrecipe runs from (`cvrecipe config
# --explain paths` prints this).
PATH_RULES = """\
paths: how cvrecipe finds the files a recipe names, whichever directory it runs from
  RECIPE (command line)   a YAML path if that file exists, else a shipped recipe's name
                          (`cvrecipe recipes` lists them; they live in {recipes})
  --space SPACE (tune)    a YAML path if that file exists, else a shipped space's name ({spaces})
  extends: OTHER          a path relative to the recipe file that says it, else a shipped recipe's name
  data.mask_classes       written in a recipe: relative to that recipe file; on the command line:
                          relative to the current directory
  data.name folder:PATH / masks:PATH (relative PATH): the first that exists of
                          1. PATH from the current directory
                          2. PATH, then its file name, in each folder of $CVRECIPE_DATA
                             (folders separated by '{sep}')
                          3. PATH from the source checkout's root, when cvrecipe runs from a checkout
                             (so the shipped recipes' ../shared/data/... finds the data beside it)
  absolute paths and ~ are used as written."""


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe: a YAML path, else the name of a shipped one (recipes/NAME.yaml)."""
    return _file_or_shipped(recipe, RECIPES_DIR, "recipe")


def resolve_space(space: str | Path) -> Path:
    """A search space: a YAML path, else the name of a shipped one (recipes/spaces/NAME.yaml)."""
    return _file_or_shipped(space, SPACES_DIR, "search space")


def _file_or_shipped(name: str | Path, folder: Path, what: str) -> Path:
    """A file found as written wins over a shipped YAML of that name in `folder`."""
    path = Path(name)
    if path.is_file():
        return path
    named = folder / f"{name}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise ConfigError(f"{what} '{name}' not found as a file or in {folder} (known: {known})")


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, description) of each shipped recipe, by name."""
    found = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        found.append((path.stem, str(raw.get("description", "")).strip()))
    return found


def _anchor_file_paths(raw: dict, folder: Path) -> None:
    """A recipe's file references (data.mask_classes) made absolute against the recipe's folder, so a
    recipe means the same files whichever directory the command runs from."""
    data = raw.get("data")
    value = data.get("mask_classes") if isinstance(data, dict) else None
    if isinstance(value, str) and not Path(value).expanduser().is_absolute():
        data["mask_classes"] = str(folder / value)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---- docs that code reads: `cvrecipe config` ------------------------------------------------------

def described(cfg: Config) -> str:
    """The resolved config as YAML, each field followed by its doc as a comment."""
    lines: list[str] = []
    _describe(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _describe(node: Any, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            _describe(value, depth + 1, lines)
        else:
            text = f"{indent}{f.name}: {_show(value)}"
            lines.append(f"{text:<40} # {f.metadata.get('doc', '')}")


def explain(key: str) -> str:
    """One field: its type and rules, default and doc (or where a moved key went); `paths`: how the
    paths a recipe names are found."""
    if key == "paths":
        return PATH_RULES.format(recipes=RECIPES_DIR, spaces=SPACES_DIR, sep=os.pathsep)
    if key in MOVED:
        if MOVED[key] is None:
            return f"{key}: {REMOVED_WHY[key]}"
        return f"{key} is now {MOVED[key]}\n\n" + explain(MOVED[key])
    hint, meta = _field_of(key)
    if dataclasses.is_dataclass(hint):
        return f"{key}: a section with keys " + ", ".join(f.name for f in dataclasses.fields(hint))
    default = getattr(_default_of(key), key.rsplit(".", 1)[-1])
    return (f"{key}\n  allowed: {allowed(hint, meta)}\n  default: {_show(default)}\n  {meta.get('doc', '')}")


def _default_of(key: str) -> Any:
    node: Any = Config()
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    return node
