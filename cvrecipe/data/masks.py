"""Image/mask pairs for segmentation: `masks:PATH`, a directory or a .tar/.tar.gz/.zip archive.

Layout: `image/NAME.*` with `label/NAME.*` or `mask/NAME.*` beside it, optionally under `train/`,
`val/` and `test/` (and under one wrapping top-level folder). A mask is read as class indices:

- a palette PNG (Pascal VOC style): the palette index is the class, 255 = not labelled (IGNORE);
- a grayscale PNG holding only 0 and 255: a binary mask, 0 → class 0 and 255 → class 1;
- any other grayscale PNG: the value is the class, 255 = not labelled.

Class names, colours and the mask values of each class may come from a YAML file (data.mask_classes,
else `classes.yaml` inside the data, else `<PATH stem>.yaml` beside it):

    classes: [membrane, cell]          # class i is named classes[i]
    values: [0, 255]                   # optional: the mask value of each class (default 0, 1, ...)
    colours: [[230, 60, 60], [0, 0, 0]]  # optional: RGB per class, for overlays

Every pair is checked before it is used: an image without a mask, a mask without an image, a mask
whose size differs from its image's, values that are no class, an image whose size differs from
the dataset's (without data.image_size) and files that do not decode are skipped and named, with
the reason, in `ImageDataset.skipped`; never resized or relabelled behind the user's back. Masks
are stored as uint8 (N, H, W) in the same content-keyed cache as classification images.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cvrecipe.data.cache import load_arrays, save_arrays
from cvrecipe.data.dataset import IGNORE, DataError, ImageDataset, Split
from cvrecipe.data.folder import (MAX_BAD_FRACTION, SKIPPED_LIST, _fingerprint, _is_archive, _iter_entries, listed,
                                  warn_once)
from cvrecipe.data.images import MAX_PIXELS, decode_images, guess_channels

SPLITS = ("train", "val", "test")
MASK_DIRS = ("label", "mask")
CACHE_VERSION = 1  # bump when mask reading changes
# colours of classes 0..9 when none are given (matplotlib's tab10, class 0 dark)
DEFAULT_COLOURS = [[40, 40, 40], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                   [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207]]


def default_colour(index: int) -> list[int]:
    if index < len(DEFAULT_COLOURS):
        return DEFAULT_COLOURS[index]
    rng = np.random.default_rng(index)
    return rng.integers(40, 256, 3).tolist()


def load_masks(path: str | Path, image_size: int | None, channels: int | None, cache_dir: Path,
               classes_file: str | None = None, max_pixels: int = MAX_PIXELS) -> ImageDataset:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder or archive not found: {path}"
                        + ("" if path.is_absolute() else " (where a relative path is looked for: `cvrecipe config --explain paths`)"))
    if not path.is_dir() and not _is_archive(path):
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz/.zip archive")
    spec_text = _classes_yaml(path, classes_file)
    spec_key = hashlib.sha256((spec_text or "").encode()).hexdigest()[:8]
    entry = cache_dir / (f"masks-v{CACHE_VERSION}-{_fingerprint(path)}-s{image_size}-c{channels}-p{max_pixels}"
                         f"-y{spec_key}")
    cached = load_arrays(entry)
    if cached is None:
        arrays, meta = _decode_pairs(path, image_size, channels, spec_text, max_pixels)
        save_arrays(entry, arrays, meta)
    else:
        arrays, meta = cached
    splits = {s: Split(arrays[f"{s}_x"], arrays[f"{s}_y"], meta["files"][s]) for s in SPLITS if f"{s}_x" in arrays}
    skipped = [tuple(s) for s in meta["skipped"]]
    if skipped:
        warn_once(f"{path}: skipped {len(skipped)} unusable file(s) (e.g. {skipped[0][0]}: {skipped[0][1]}); "
                  f"all listed in {listed(entry, SKIPPED_LIST, skipped)}")
    return ImageDataset(name=f"masks:{path}", classes=meta["classes"], skipped=skipped, colours=meta["colours"],
                        hflip_ok=True, **splits)


def _classes_yaml(path: Path, classes_file: str | None) -> str | None:
    """The class YAML's text: data.mask_classes, classes.yaml in the data, or PATH-stem.yaml beside it."""
    if classes_file is not None:
        file = Path(classes_file).expanduser()
        if not file.is_file():
            raise DataError(f"data.mask_classes={classes_file}: no such file")
        return file.read_text()
    if path.is_dir():
        inside = [path / "classes.yaml", *(p / "classes.yaml" for p in sorted(path.iterdir()) if p.is_dir())]
        found = next((p for p in inside if p.is_file()), None)
        if found is not None:
            return found.read_text()
    stem = path.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        stem = stem.removesuffix(suffix)
    beside = path.parent / f"{stem}.yaml"
    return beside.read_text() if beside.is_file() else None


def _parse_spec(text: str | None, where: str) -> dict | None:
    """{'classes': names, 'values': mask value per class, 'colours': RGB per class} or None."""
    if text is None:
        return None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{where}: the classes YAML is not valid YAML: {err}") from err
    names = raw.get("classes") if isinstance(raw, dict) else None
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"{where}: the classes YAML needs 'classes: [name, name, ...]' (at least 2)")
    values = raw.get("values", list(range(len(names))))
    colours = raw.get("colours", [default_colour(i) for i in range(len(names))])
    if len(values) != len(names) or len(colours) != len(names):
        raise DataError(f"{where}: the classes YAML lists {len(names)} classes, {len(values)} values and "
                        f"{len(colours)} colours; expected one of each per class")
    if any(not isinstance(v, int) or not 0 <= v < 256 for v in values) or len(set(values)) != len(values):
        raise DataError(f"{where}: mask values must be distinct integers 0..255 (255 marks unlabelled pixels "
                        f"unless a class has it), got {values}")
    return {"classes": [str(n) for n in names], "values": values, "colours": [list(map(int, c)) for c in colours]}


def _group_pairs(path: Path) -> tuple[dict, list[tuple[str, str]]]:
    """{split: {stem: {"image": (rel, bytes), "mask": (rel, bytes)}}} and the files that fit no pair."""
    groups: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    stray = []
    for rel, data in _iter_entries(path):  # data: a function that reads the file, None for a folder
        parts = rel.strip("/").split("/")
        if data is None or any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] == "classes.yaml":
            continue
        if len(parts) >= 3 and parts[0] not in SPLITS and parts[0] not in ("image", *MASK_DIRS):
            parts = parts[1:]  # one wrapping top-level folder
        split = parts[0] if parts[0] in SPLITS else "train"
        inner = parts[1:] if parts[0] in SPLITS else parts
        if len(inner) != 2 or inner[0] not in ("image", *MASK_DIRS):
            stray.append(rel)
            continue
        kind = "image" if inner[0] == "image" else "mask"
        stem = Path(inner[1]).stem
        if kind in groups[split][stem]:
            stray.append(rel)  # a second mask (label/ and mask/) or image of the same name
            continue
        groups[split][stem][kind] = (rel, data())  # the entry's reader, called while its archive is open
    if not groups:
        raise DataError(f"{path}: no image/NAME.* + label/NAME.* (or mask/NAME.*) pairs found "
                        f"(found {len(stray)} other files, e.g. {stray[:3]})")
    if stray:
        warn_once(f"{path}: ignored {len(stray)} files outside image/ and label/ (or mask/), e.g. {stray[:3]}")
    return groups, stray


def read_mask(data: bytes) -> tuple[np.ndarray, bool]:
    """(H, W) uint8 values of a mask file, and whether they are palette indices."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    if img.mode == "P":
        return np.asarray(img, np.uint8), True
    if img.mode == "1":
        return np.asarray(img, np.uint8) * 255, False
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img)
        if values.max() > 255:
            raise ValueError(f"16-bit mask with values up to {values.max()}; masks hold class indices 0..255")
        return values.astype(np.uint8), False
    if img.mode != "L":
        raise ValueError(f"mask mode {img.mode}: expected a palette (P) or grayscale (L) PNG of class indices")
    return np.asarray(img, np.uint8), False


def _decode_pairs(path: Path, image_size: int | None, channels: int | None, spec_text: str | None,
                  max_pixels: int = MAX_PIXELS):
    spec = _parse_spec(spec_text, str(path))
    groups, _ = _group_pairs(path)
    skipped: list[tuple[str, str]] = []
    pairs = {}  # split → [(stem, image item, mask values)]
    palette = None
    for split in [s for s in SPLITS if s in groups]:
        pairs[split] = []
        for stem, found in sorted(groups[split].items()):
            if "mask" not in found:
                skipped.append((found["image"][0], "image without a mask (expected label/NAME.* or mask/NAME.*)"))
                continue
            if "image" not in found:
                skipped.append((found["mask"][0], "mask without an image (expected image/NAME.*)"))
                continue
            try:
                values, is_palette = read_mask(found["mask"][1])
            except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this pair"
                skipped.append((found["mask"][0], f"unreadable mask: {type(err).__name__}: {err}"))
                continue
            if is_palette and palette is None:
                palette = Image.open(io.BytesIO(found["mask"][1])).getpalette()
            pairs[split].append((stem, found["image"], found["mask"][0], values))
    all_pairs = [p for items in pairs.values() for p in items]
    if not all_pairs:
        raise DataError(f"{path}: no usable image/mask pair (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped
                        else f"{path}: no image/mask pairs")
    classes, lookup = _class_table(spec, [v for *_, v in all_pairs])
    if channels is None:
        channels = guess_channels([item[1] for _, item, _, _ in all_pairs[:: max(1, len(all_pairs) // 64)]])
    size = _common_size(all_pairs, image_size)
    arrays, files = {}, {}
    for split, items in pairs.items():
        x, y, names = _decode_split(items, channels, size, image_size, lookup, skipped, max_pixels)
        arrays[f"{split}_x"], arrays[f"{split}_y"], files[split] = x, y, names
    total = sum(len(g) for g in groups.values())
    if len(skipped) > MAX_BAD_FRACTION * total:
        raise DataError(f"{path}: {len(skipped)} of {total} pairs cannot be used (e.g. {skipped[0][0]}: "
                        f"{skipped[0][1]}); refusing a mostly unusable dataset")
    colours = spec["colours"] if spec else [_palette_colour(palette, v) if palette else default_colour(i)
                                            for i, v in enumerate(lookup["values"])]
    meta = {"source": str(path), "classes": classes, "colours": colours, "skipped": skipped, "files": files,
            "channels": channels, "values": lookup["values"]}
    return arrays, meta


def _palette_colour(palette: list[int], index: int) -> list[int]:
    return palette[3 * index:3 * index + 3] if len(palette) >= 3 * index + 3 else default_colour(index)


def _class_table(spec: dict | None, masks: list[np.ndarray]) -> tuple[list[str], dict]:
    """Class names, and how mask values become class indices: {'values': value of each class,
    'table': (256,) uint8 value → class index (IGNORE for unlabelled, 254 + 1 never a class)}."""
    seen = np.zeros(256, bool)
    for values in masks:
        seen[np.unique(values)] = True
    if spec is not None:
        values = spec["values"]
        names = spec["classes"]
    elif set(np.flatnonzero(seen)) <= {0, IGNORE} and seen[IGNORE]:
        values, names = [0, IGNORE], ["0", "255"]  # binary 0/255 masks: 255 is the second class, not "unlabelled"
    else:
        top = int(np.flatnonzero(seen[:IGNORE]).max()) if seen[:IGNORE].any() else 0
        values = list(range(max(top + 1, 2)))
        names = [str(v) for v in values]
    table = np.full(256, OUTSIDE, np.uint8)
    table[IGNORE] = IGNORE
    for index, value in enumerate(values):
        table[value] = index
    return names, {"values": values, "table": table}


OUTSIDE = 254  # marks a mask value that is no class while masks are converted (never stored)


def _common_size(pairs: list, image_size: int | None) -> tuple[int, int] | None:
    """The (H, W) every image must have: data.image_size, else the commonest among the images."""
    if image_size is not None:
        return (image_size, image_size)
    sizes = Counter(values.shape for *_, values in pairs)
    return sizes.most_common(1)[0][0]


def _decode_split(items: list, channels: int, size: tuple[int, int], resize: int | None, lookup: dict,
                  skipped: list, max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one split's images (as classification decodes them) and check each pair."""
    x, good, bad = _decode_native(items, channels, max_pixels)
    skipped += bad
    images, masks, names = [], [], []
    for row, i in enumerate(good):
        stem, (image_name, _), mask_name, values = items[i]
        image = x[row]
        if image.shape[1:] != values.shape:
            skipped.append((mask_name, f"mask is {values.shape[1]}x{values.shape[0]}, its image {image_name} is "
                                       f"{image.shape[2]}x{image.shape[1]}"))
            continue
        if resize is None and image.shape[1:] != size:
            skipped.append((image_name, f"image is {image.shape[2]}x{image.shape[1]}, the dataset's images are "
                                        f"{size[1]}x{size[0]}; set data.image_size to resize them all"))
            continue
        classes = lookup["table"][values]
        outside = np.unique(values[classes == OUTSIDE])
        if len(outside):
            skipped.append((mask_name, f"mask values {outside[:10].tolist()} are no class (classes have values "
                                       f"{lookup['values']}; 255 = unlabelled)"))
            continue
        if resize is not None and image.shape[1:] != size:
            image, classes = _resize_pair(image, classes, size)
        images.append(image)
        masks.append(classes)
        names.append(image_name)
    h, w = size
    x_out = np.stack(images) if images else np.zeros((0, channels, h, w), np.uint8)
    y_out = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
    return np.ascontiguousarray(x_out), np.ascontiguousarray(y_out), names


def _decode_native(items: list, channels: int, max_pixels: int
                   ) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    """Each image at its own size (decode_images would resize them to one size); images declaring
    more than `max_pixels` are refused unread."""
    out, good, bad = [], [], []
    for i, (_, item, _, _) in enumerate(items):
        x, ok, failed = decode_images([item], channels, None, threads=1, max_pixels=max_pixels)
        if ok:
            out.append(x[0])
            good.append(i)
        bad += failed
    return out, good, bad


def _resize_pair(image: np.ndarray, classes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """data.image_size asked for it: bilinear (antialiased) for the image, nearest for the mask."""
    import torch
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    x = resize(torch.from_numpy(image), list(size), antialias=True)
    y = resize(torch.from_numpy(classes)[None], list(size), InterpolationMode.NEAREST_EXACT)[0]
    return x.numpy(), y.numpy()
