"""Box annotations in the three formats users bring, read into one common in-memory form.

    COCO JSON     {"images": [...], "annotations": [{"bbox": [x, y, w, h], ...}], "categories": [...]}
                  one file per split (its name or folder says which: instances_train2017.json,
                  valid/_annotations.coco.json); bbox is x, y, width, height in pixels; category
                  ids may start at 0 or 1 or have gaps: classes are the categories in id order.
                  Crowd regions (iscrowd=1) are left out: they are not single objects.
    YOLO txt      data.yaml (names, and train/val/test image folders; a folder named twice is
                  train before test before val) + images/ + labels/; one
                  `class cx cy w h` line per box, normalised to [0, 1] by the image's width/height;
                  an image without a label file has no boxes (kept, empty).
    Pascal VOC    one XML per image (<size>, <object><name/><bndbox>xmin..ymax</bndbox>), parsed
                  with defusedxml; splits from ImageSets/Main/<split>.txt when present. Pixel
                  coordinates are read as given (VOC's 1-based corners are not shifted: one pixel
                  is below anything the metrics resolve).

A folder or a .zip/.tar/.tar.gz archive of any of them (under one wrapping folder too). The common
form (`BoxDataset`): per image its file, size (the image's own header wins over the annotation's),
boxes (n, 4) float32 x1, y1, x2, y2 in pixels and labels (n,) int64 class indices; the class names;
the splits. A bad annotation never stops the read: it is skipped or repaired and named with its file
in `problems`, which `problem_lines` turns into one line per kind for the caller to print:

    clipped            a box partly outside the image, clipped to it (kept)
    outside            a box wholly outside the image (dropped)
    zero_area          a box with no width or height, or with x2 < x1 (dropped)
    unknown_class      a class id or name the dataset does not declare (box dropped)
    malformed          a line, object or file that does not parse (that part dropped)
    image_missing      an annotation whose image is not there (dropped)
    label_without_image  a YOLO label file with no image beside it (ignored)
    unreadable_image   an image whose header does not parse (dropped)
    size_mismatch      annotation's declared size differs from the image (the image's is used)
"""
from __future__ import annotations

import json
import posixpath
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from cvrecipe.data.dataset import DataError
from cvrecipe.data.folder import _is_archive, _iter_entries
from cvrecipe.imagefile import ImageRefused, read_header

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
# pixels a box may pass the image's edge by without being named clipped: YOLO's normalised centre and
# size printed to 6 decimals put an edge up to ~1e-6 x the side outside (-0.000128 px at 256 px)
ROUNDING_PX = 0.01
NAMED_PER_KIND = 5  # files named per problem line; the full list stays in BoxDataset.problems


@dataclass
class BoxImage:
    file: str  # path inside the dataset (folder or archive), POSIX separators
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2 in pixels, 0 <= x1 < x2 <= width
    labels: np.ndarray  # (n,) int64 class index


@dataclass
class Problem:
    kind: str  # see the module docstring
    file: str  # the annotation (or image) file it was found in
    detail: str = ""


@dataclass
class BoxDataset:
    source: str
    format: str  # coco | yolo | voc
    classes: list[str]
    splits: dict[str, list[BoxImage]]  # train / val / test, as the dataset declares them
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, tuple[int, int]]:
        """{split: (images, boxes)}."""
        return {s: (len(items), sum(len(i.labels) for i in items)) for s, items in self.splits.items()}


def problem_lines(problems: list[Problem]) -> list[str]:
    """One line per kind: how many, and the first few files with what was wrong."""
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for kind, found in by_kind.items():
        named = "; ".join(f"{p.file}{f' ({p.detail})' if p.detail else ''}" for p in found[:NAMED_PER_KIND])
        more = f"; and {len(found) - NAMED_PER_KIND} more" if len(found) > NAMED_PER_KIND else ""
        lines.append(f"{kind}: {len(found)} — {named}{more}")
    return lines


# ---- reading ------------------------------------------------------------------------------------

def read_boxes(path: str | Path, classes: list[str] | None = None, fmt: str | None = None) -> BoxDataset:
    """Read a COCO, YOLO or VOC dataset from a folder or archive. `fmt` (coco | yolo | voc) says
    which where a folder holds several; by default a data.yaml means YOLO, else JSON means COCO, else
    XML means VOC. `classes` (VOC only) fixes the class list and order; other names become
    unknown_class."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"box dataset not found: {path}")
    if not path.is_dir() and not _is_archive(path):
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz/.zip archive")
    files = _Files(path)
    if fmt is not None:
        readers = {"coco": _read_coco, "yolo": _read_yolo, "voc": lambda f: _read_voc(f, classes)}
        if fmt not in readers:
            raise DataError(f"unknown box format '{fmt}'; known: coco, yolo, voc")
        return readers[fmt](files)
    if any(PurePosixPath(n).name in ("data.yaml", "data.yml") for n in files.texts):
        return _read_yolo(files)
    if any(n.endswith(".json") for n in files.texts):
        return _read_coco(files)
    if any(n.endswith(".xml") for n in files.texts):
        return _read_voc(files, classes)
    raise DataError(f"{path}: no COCO JSON, YOLO data.yaml or Pascal VOC XML found")


class _Files:
    """One pass over the folder or archive: annotation files' text, images' sizes (headers only)."""

    def __init__(self, path: Path):
        self.source = str(path)
        self.texts: dict[str, bytes] = {}
        self.sizes: dict[str, tuple[int, int] | str] = {}  # image → (width, height), or why unreadable
        for rel, read in _iter_entries(path):
            parts = rel.strip("/").split("/")
            if read is None or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            suffix = PurePosixPath(rel).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                try:
                    header = read_header(read())
                    self.sizes[rel] = (header.width, header.height)
                except ImageRefused as err:
                    self.sizes[rel] = str(err)
            elif suffix in (".json", ".xml", ".txt", ".yaml", ".yml"):
                self.texts[rel] = read()
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for rel in self.sizes:
            self.by_name[PurePosixPath(rel).name].append(rel)

    def find_image(self, name: str, near: str) -> str | None:
        """The image `name` refers to: relative to the folder of `near` (or its parent, or an
        images/ folder beside it), else the only image with that file name."""
        base = posixpath.dirname(near)
        for folder in (base, posixpath.dirname(base), posixpath.join(base, "images"),
                       posixpath.join(posixpath.dirname(base), "images"), ""):
            candidate = posixpath.normpath(posixpath.join(folder, name)) if folder else posixpath.normpath(name)
            if candidate in self.sizes:
                return candidate
        matches = self.by_name.get(PurePosixPath(name).name, [])
        return matches[0] if len(matches) == 1 else None


def _split_of(rel: str, default: str = "train", with_name: bool = False) -> str:
    """The split a path's folders name (train, valid, test2017, ...); `with_name`: its file name too
    (COCO's instances_val2017.json), not for images or per-image files, whose names are arbitrary."""
    parts = PurePosixPath(rel.lower()).parts
    for part in reversed(parts if with_name else parts[:-1]):
        stem = PurePosixPath(part).stem
        for token in stem.replace("-", "_").replace(".", "_").split("_"):
            token = token.rstrip("0123456789")
            if token in SPLIT_NAMES:
                return SPLIT_NAMES[token]
    return default


class _Builder:
    """Accumulates images per split, checking and repairing each box against its image."""

    def __init__(self, files: _Files, fmt: str):
        self.files, self.format = files, fmt
        self.splits: dict[str, list[BoxImage]] = defaultdict(list)
        self.problems: list[Problem] = []

    def problem(self, kind: str, file: str, detail: str = "") -> None:
        self.problems.append(Problem(kind, file, detail))

    def image_size(self, image: str, note: str, declared: tuple[int, int] | None) -> tuple[int, int] | None:
        size = self.files.sizes[image]
        if isinstance(size, str):
            self.problem("unreadable_image", image, size)
            return None
        if declared is not None and tuple(declared) != size:
            self.problem("size_mismatch", note, f"declares {declared[0]}x{declared[1]}, image is {size[0]}x{size[1]}")
        return size

    def add(self, split: str, image: str, size: tuple[int, int], boxes: list, labels: list, note: str) -> None:
        """Clip each xyxy box to the image; drop and name the empty and the wholly outside ones."""
        width, height = size
        kept_boxes, kept_labels = [], []
        for i, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels)):
            if not (x2 > x1 and y2 > y1):
                self.problem("zero_area", note, f"box {i}: {_fmt((x1, y1, x2, y2))}")
                continue
            cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
            if not (cx2 > cx1 and cy2 > cy1):
                self.problem("outside", note, f"box {i}: {_fmt((x1, y1, x2, y2))} in {width}x{height}")
                continue
            if max(cx1 - x1, cy1 - y1, x2 - cx2, y2 - cy2) > ROUNDING_PX:
                self.problem("clipped", note, f"box {i}: {_fmt((x1, y1, x2, y2))} to {width}x{height}")
            kept_boxes.append((cx1, cy1, cx2, cy2))
            kept_labels.append(label)
        self.splits[split].append(BoxImage(image, width, height, np.asarray(kept_boxes, np.float32).reshape(-1, 4),
                                           np.asarray(kept_labels, np.int64)))

    def finish(self, classes: list[str]) -> BoxDataset:
        splits = {s: sorted(self.splits[s], key=lambda i: i.file) for s in ("train", "val", "test") if s in self.splits}
        if not splits:
            raise DataError(f"{self.files.source}: no usable annotated image ({len(self.problems)} problems: "
                            f"{'; '.join(problem_lines(self.problems)[:3])})")
        return BoxDataset(self.files.source, self.format, classes, splits, self.problems)


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# ---- COCO ---------------------------------------------------------------------------------------

def _read_coco(files: _Files) -> BoxDataset:
    docs = {}
    for name, data in sorted(files.texts.items()):
        if not name.endswith(".json"):
            continue
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            files_problem = Problem("malformed", name, f"not JSON: {err}")
            docs[name] = files_problem
            continue
        if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
            docs[name] = doc
    builder = _Builder(files, "coco")
    builder.problems += [d for d in docs.values() if isinstance(d, Problem)]
    docs = {n: d for n, d in docs.items() if isinstance(d, dict)}
    if not docs:
        raise DataError(f"{files.source}: no COCO JSON (a file with images and annotations) found")
    # classes: the union of the files' categories, in id order (ids 0- or 1-based or sparse alike)
    categories: dict[int, str] = {}
    for doc in docs.values():
        for cat in doc.get("categories", []):
            if isinstance(cat, dict) and isinstance(cat.get("id"), int):
                categories.setdefault(cat["id"], str(cat.get("name", cat["id"])))
    index = {cid: i for i, cid in enumerate(sorted(categories))}
    for name, doc in docs.items():
        _coco_file(builder, name, doc, _split_of(name, with_name=True), index)
    return builder.finish([categories[c] for c in sorted(categories)])


def _coco_file(builder: _Builder, name: str, doc: dict, split: str, index: dict[int, int]) -> None:
    boxes: dict = defaultdict(list)
    for k, ann in enumerate(doc["annotations"]):
        if isinstance(ann, dict) and ann.get("iscrowd"):
            continue  # a crowd region is not one object: COCO's own evaluation ignores it too
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes[ann["image_id"]].append(((x, y, x + w, y + h), ann["category_id"], k))
        except (KeyError, TypeError, ValueError) as err:
            builder.problem("malformed", name, f"annotation {k}: {type(err).__name__} {err}")
    for img in doc["images"]:
        try:
            image_id, file_name = img["id"], str(img["file_name"])
            declared = (int(img["width"]), int(img["height"])) if "width" in img and "height" in img else None
        except (KeyError, TypeError, ValueError) as err:
            builder.problem("malformed", name, f"image entry {img!r:.80}: {type(err).__name__} {err}")
            continue
        image = builder.files.find_image(file_name, name)
        mine = boxes.pop(image_id, [])
        if image is None:
            builder.problem("image_missing", name, f"{file_name} ({len(mine)} boxes)")
            continue
        size = builder.image_size(image, f"{name} [{file_name}]", declared)
        if size is None:
            continue
        kept, labels = [], []
        for box, category, k in mine:
            if category not in index:
                builder.problem("unknown_class", name, f"annotation {k}: category_id {category}")
                continue
            kept.append(box)
            labels.append(index[category])
        builder.add(split, image, size, kept, labels, f"{name} [{file_name}]")
    for image_id, anns in boxes.items():
        builder.problem("image_missing", name, f"{len(anns)} annotation(s) of image_id {image_id}, not in images")


# ---- YOLO ---------------------------------------------------------------------------------------

def _read_yolo(files: _Files) -> BoxDataset:
    found = [n for n in files.texts if PurePosixPath(n).name in ("data.yaml", "data.yml")]
    if not found:
        raise DataError(f"{files.source}: no data.yaml (YOLO's class names and split folders)")
    yaml_name = min(found, key=len)
    try:
        spec = yaml.safe_load(files.texts[yaml_name]) or {}
        names = spec["names"]
        classes = [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise DataError(f"{yaml_name}: cannot read the class names (a `names:` list or mapping): {err}") from err
    root = posixpath.dirname(yaml_name)
    split_dirs = {}  # image folder prefix → split, from data.yaml's train/val/test entries
    # a folder named for several splits belongs to train before test before val (later keys win):
    # Ultralytics' coco128 gives val = train, and sets made for its trainer often give val = test;
    # the val split is the one cvrecipe can make itself, held out of train (data.val_fraction)
    for key in ("val", "test", "train"):
        entry = spec.get(key)
        for folder in (entry if isinstance(entry, list) else [entry] if isinstance(entry, str) else []):
            split_dirs[posixpath.normpath(posixpath.join(root, folder))] = key
    builder = _Builder(files, "yolo")
    labelled = set()
    for image in sorted(files.sizes):
        label_file = _yolo_label_path(image)
        if label_file is None or not image.startswith(root):
            continue
        labelled.add(label_file)
        split = next((s for d, s in split_dirs.items() if image.startswith(d + "/")), None) or _split_of(image)
        size = builder.image_size(image, image, None)
        if size is None:
            continue
        boxes, labels = _yolo_lines(builder, label_file, files.texts.get(label_file, b""), size, len(classes))
        builder.add(split, image, size, boxes, labels, label_file)
    for name in sorted(files.texts):
        if name.endswith(".txt") and "labels" in PurePosixPath(name).parts and name not in labelled:
            builder.problem("label_without_image", name)
    return builder.finish(classes)


def _yolo_label_path(image: str) -> str | None:
    """images/train/a.jpg → labels/train/a.txt (the last `images` folder becomes `labels`)."""
    parts = list(PurePosixPath(image).parts)
    if "images" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("images")
    parts[at] = "labels"
    return str(PurePosixPath(*parts).with_suffix(".txt"))


def _yolo_lines(builder: _Builder, name: str, data: bytes, size: tuple[int, int], num_classes: int):
    width, height = size
    boxes, labels = [], []
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            label = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:5])
            if len(fields) != 5:
                raise ValueError(f"{len(fields)} fields, expected 5 (class cx cy w h)")
        except ValueError as err:
            builder.problem("malformed", name, f"line {n}: {err}")
            continue
        if max(cx, cy, w, h) > 1.5:  # pixel coordinates where normalised ones belong
            builder.problem("malformed", name, f"line {n}: values above 1 ({line.strip()}); YOLO boxes are "
                                               f"normalised by the image's width and height")
            continue
        if not 0 <= label < num_classes:
            builder.problem("unknown_class", name, f"line {n}: class {label} (data.yaml names {num_classes})")
            continue
        boxes.append(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height))
        labels.append(label)
    return boxes, labels


# ---- Pascal VOC ---------------------------------------------------------------------------------

def _read_voc(files: _Files, classes: list[str] | None) -> BoxDataset:
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    parsed = {}
    builder = _Builder(files, "voc")
    for name in sorted(n for n in files.texts if n.endswith(".xml")):
        try:
            root = ElementTree.fromstring(files.texts[name])
        except (ElementTree.ParseError, DefusedXmlException) as err:
            builder.problem("malformed", name, f"XML: {err}")
            continue
        if root.tag == "annotation":
            parsed[name] = root
    if not parsed and not builder.problems:
        raise DataError(f"{files.source}: no Pascal VOC <annotation> XML found")
    seen = sorted({(o.findtext("name") or "").strip() for r in parsed.values() for o in r.iter("object")} - {""})
    classes = list(classes) if classes else seen
    index = {c: i for i, c in enumerate(classes)}
    image_sets = _voc_image_sets(files)
    for name, root in parsed.items():
        file_name = (root.findtext("filename") or PurePosixPath(name).stem + ".jpg").strip()
        image = files.find_image(file_name, name) or files.find_image(posixpath.join("JPEGImages", file_name), name)
        if image is None:
            builder.problem("image_missing", name, file_name)
            continue
        declared = _voc_size(root)
        size = builder.image_size(image, name, declared)
        if size is None:
            continue
        boxes, labels = [], []
        for k, obj in enumerate(root.iter("object")):
            label = (obj.findtext("name") or "").strip()
            try:
                box = tuple(float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                builder.problem("malformed", name, f"object {k} ({label}): no numeric bndbox xmin/ymin/xmax/ymax")
                continue
            if label not in index:
                builder.problem("unknown_class", name, f"object {k}: '{label}'")
                continue
            boxes.append(box)
            labels.append(index[label])
        stem = PurePosixPath(name).stem
        split = image_sets.get(stem) or _split_of(name)
        builder.add(split, image, size, boxes, labels, name)
    return builder.finish(classes)


def _voc_size(root) -> tuple[int, int] | None:
    try:
        return int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        return None


def _voc_image_sets(files: _Files) -> dict[str, str]:
    """{image stem: split} from ImageSets/Main/{train,val,test}.txt (trainval is train + val)."""
    found = {}
    for name, data in files.texts.items():
        path = PurePosixPath(name)
        if "ImageSets" in path.parts and path.stem in ("train", "val", "test"):
            for line in data.decode("utf-8", "replace").split("\n"):
                if line.strip():
                    found[line.split()[0]] = path.stem
    return found


def class_balance(ds: BoxDataset, split: str = "train") -> Counter:
    """{class name: boxes} in `split`."""
    counts = Counter()
    for item in ds.splits.get(split, []):
        counts.update(ds.classes[i] for i in item.labels.tolist())
    return counts


def read_image_bytes(source: str | Path, wanted: list[str]) -> dict[str, bytes]:
    """{file: bytes} of the images `wanted`, in one pass over the folder or archive."""
    wanted_set = set(wanted)
    return {rel: read() for rel, read in _iter_entries(Path(source)) if read is not None and rel in wanted_set}
