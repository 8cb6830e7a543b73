"""Typed configuration: one dataclass tree, loaded from YAML and overridden with dotted keys.

A recipe is a YAML file whose keys mirror the dataclasses below. Every field has a default and
a one-line docstring-comment; unknown keys and wrong types are errors that name the key, so a
typo in a recipe never silently trains the wrong thing.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # dataset: a registered name or folder:PATH (dir or archive)
    image_size: int | None = None  # resize every image to this square size; None keeps native size
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); None decides from the data
    val_fraction: float = 0.1  # held out of train, stratified, when the source has no val split (0 = none:
    #                            every training image trains, the last epoch's weights are kept)
    subset: int | None = None  # use only this many training images (stratified); for quick runs
    normalize: bool = True  # standardise inputs with the training set's per-channel mean/std
    hflip_ok: bool | None = None  # may images be mirrored left-right? None asks the dataset
    cache_dir: str | None = None  # where decoded uint8 arrays live; None = $CVRECIPE_CACHE or ~/.cache/cvrecipe


@dataclass
class AugmentConfig:
    hflip: bool = False  # random horizontal flip (only where the dataset allows it)
    crop_padding: int = 0  # random crop after this many pixels of padding on each side; 0 = off
    pad_mode: str = "reflect"  # padding for the crop: reflect | constant
    cutout: int = 0  # side in pixels of one zeroed square per image; 0 = off
    flip_mode: str = "random"  # random: a coin per image per epoch | alternate: a coin per image per run,
    #                            then flipped every other epoch (each image seen both ways every 2 epochs)


@dataclass
class ModelConfig:
    name: str = "small-cnn"  # a registered model name (see `cvrecipe models`)
    dropout: float = 0.0  # dropout before the classifier, where the model has one
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the model constructor
    init_bias_prior: bool = False  # start the last layer's bias at log(class prior): init loss = prior entropy


@dataclass
class TrainConfig:
    epochs: int = 10  # maximum number of passes over the training set
    batch_size: int = 128  # images per optimisation step
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adam | adamw
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum / Adam beta1
    weight_decay: float = 5e-4  # L2 (SGD, Adam) or decoupled (AdamW) weight decay
    units: str = "batch"  # batch: lr/weight_decay as torch takes them | per1024: speedrun units (see optim.py)
    bias_lr_scale: float = 1.0  # lr multiplier for normalisation-layer biases (64 in the speedrun recipes)
    schedule: str = "onecycle"  # onecycle | cosine | constant | triangular
    warmup_epochs: float = 0.0  # linear warm-up length for cosine/constant (epochs, fractional ok)
    onecycle_pct: float = 0.25  # fraction of training spent rising to the peak lr (onecycle, triangular)
    triangle_ends: list = field(default_factory=lambda: [0.2, 0.07])  # triangular: lr factor at start, at end
    ema: str = "none"  # none | ema: evaluate an average of the weights | lookahead: also pull the weights to it
    ema_decay: float = 0.774  # peak decay per update (0.95 ** 5), ramped up as (step / total) ** 3
    ema_every: int = 5  # optimisation steps between weight-average updates
    bn_recalibrate: int = 0  # recompute BatchNorm statistics for the weights that are evaluated (the
    #                          average, with train.ema) over this many random training images, without
    #                          augmentation: after the last epoch, and after every epoch with a val split.
    #                          0 = keep the running averages from training
    muon_lr: float = 0.24  # optimizer=muon: lr of the orthogonalised conv-filter updates (other params: SGD)
    muon_momentum: float = 0.6  # optimizer=muon: momentum of the conv-filter updates
    compile: bool = False  # torch.compile the model (first steps pay a one-time compile)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float | None = None  # clip the global gradient norm to this value; None = off
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA when supported, fp32 on CPU)
    channels_last: bool = True  # memory format for conv nets; faster on CPU and GPU here
    early_stopping: bool = False  # stop when the monitored metric stops improving
    monitor: str = "val_loss"  # metric for early stopping and the best checkpoint
    mode: str = "min"  # min | max: direction in which `monitor` improves
    patience: int = 10  # epochs without improvement before stopping
    min_delta: float = 0.0  # smallest change that counts as an improvement
    seed: int = 0  # seeds weights, data order and augmentation
    deterministic: bool = False  # deterministic kernels; resume is then bit-identical on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20  # steps between progress/NaN checks (each check costs a device sync)
    checkpoint_every_s: float = 0.0  # write last.ckpt (and, without a val split, best.safetensors) when
    #                                  this many seconds have passed since the last write, and after the
    #                                  last epoch; 0 = after every epoch. A resume restarts from the last write
    num_threads: int | None = None  # torch CPU threads; None = torch default
    sanity: bool = True  # run the sanity checks (`cvrecipe doctor`) before training; a fail stops the run


@dataclass
class EvalConfig:
    tta: int = 0  # test-time augmentation: 0 off | 1 image + mirror | 2 also 1-pixel shifts (6 views);
    # mirrored views only when the model trained on mirrored images (augment.hflip, on a dataset that allows it)


@dataclass
class FinetuneConfig:
    strategy: str = "none"  # none (train everything, no special handling) | linear | full | two-stage | lora
    freeze_epochs: int = 0  # two-stage: epochs training only the new head before the backbone unfreezes
    backbone_lr_scale: float = 0.1  # lr of the backbone's last layer, × train.lr (the head gets 1×)
    layer_decay: float = 1.0  # each earlier backbone layer's lr is this × the next one's (1 = no decay)
    freeze_layers: int = 0  # full/two-stage: this many backbone layers, from the input, never train
    bn_eval: bool = False  # full/two-stage: BatchNorm keeps normalising with its pretrained statistics
    #                        while its scale/shift train (steadier on small data and small batches)
    feature_cache: bool = False  # linear: compute backbone features once, train the head on them
    lora_rank: int = 8  # lora: rank r of each adapter (A: r × in, B: out × r)
    lora_alpha: float = 16.0  # lora: the adapter's output is scaled by alpha / r


@dataclass
class TrackConfig:
    mlflow: bool = False  # log params, per-epoch metrics, the model and the report to MLflow
    mlflow_uri: str | None = None  # MLflow tracking URI; None = sqlite:///mlflow.db in the working directory
    experiment: str = "cvrecipe"  # MLflow experiment name (created on first use)


@dataclass
class Config:
    name: str = "run"  # run name: the folder under runs/
    runs_dir: str = "runs"  # parent folder of run folders
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (valid: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against a simple type hint; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key '{path}' may not be null")
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict, list) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key '{path}' expects {names}, got {value!r} ({type(value).__name__})")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe (a path or a name in recipes/) plus overrides into a checked Config."""
    raw = read_recipe(recipe) if recipe is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw)


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
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: 'extends' expects a recipe name or path, got {base!r}")
    # a relative path is relative to the extending file; a bare name is looked up in recipes/
    base_path = path.parent / base
    return _merge(read_recipe(base_path if base_path.is_file() else base, (*chain, path)), raw)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe '{recipe}' not found as a file or in {RECIPES_DIR} (known: {known})")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
