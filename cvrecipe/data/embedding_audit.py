"""The embedding audit: near duplicates, train/test leakage and likely label errors, in stages.

    embed        every image through the embedder, a batch at a time (plus the mirrored images
                 of every split but the largest, so mirrored copies across splits are found)
    neighbours   exact K-nearest-neighbour search and the pixel check of each candidate pair
                 (neardup.py), decided by thresholds calibrated on the dataset itself
    probe        K-fold logistic-regression probe on the embeddings: out-of-sample probabilities
    cleanlab     confident learning on those probabilities: likely label errors, ranked
    mask probe   (segmentation, in place of the two above) a K-fold per-pixel probe on Lite0's
                 feature maps, then cleanlab.segmentation: masks that disagree, ranked (mask_issues.py)

Each stage shows a progress bar. The result goes into audit.json; two plain-text files sit beside
it for the rest of the loop: exclude.txt (images to train without: data.exclude=FILE) and
leaks.txt (held-out images with a copy in train: `eval` scores without them too).
Image ids are file names for folder data (e.g. train/cat/0001.jpg), else SPLIT:INDEX.
"""
from __future__ import annotations

import csv
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cvrecipe.data import label_issues as L
from cvrecipe.data import neardup as N
from cvrecipe.data.audit import Index
from cvrecipe.data.embed import Embedder, embed

MAX_LISTED = 1000  # pairs / label issues written into audit.json (counts are always complete)
MIN_PROBE_IMAGES = 20  # fewer labelled images than this: no probe, no label-error ranking
MIN_MASK_IMAGES = 2 * L.FOLDS  # fewer masks than this: no K-fold mask probe
SHOWN_MASKS = 24  # mask label-error candidates drawn in the page (all ranked ones are in audit.json)


def image_id(index: Index, g: int) -> str:
    """A stable name for image g: its file for folder data, else SPLIT:INDEX."""
    d = index.describe(g)
    name = d["file"] or f"{d['split']}:{d['index']}"
    return f"reference:{name}" if d["split"].startswith("reference ") else name


@contextmanager
def stage_bar(console: Console, name: str, total: int, seconds: dict):
    """A progress bar for one stage; yields advance(n); records the stage's seconds."""
    columns = [TextColumn(f"{name:11s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(name, total=total)
        yield lambda n=1: progress.advance(task, n)
    seconds[name] = round(time.perf_counter() - t0, 1)
    console.print(f"  {name}: {seconds[name]:.1f}s")


def embed_parts(index: Index, embedder: Embedder, console: Console, seconds: dict
                ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(N, D) embeddings of every image, and {global row: mirrored embedding} for the images of
    every split except the largest (the mirror then covers every pair across splits)."""
    sizes = [len(y) for _, _, y in index.parts]
    largest = int(np.argmax(sizes)) if len(sizes) > 1 else -1
    mirror_parts = [k for k in range(len(sizes)) if k != largest]
    total = sum(sizes) + sum(sizes[k] for k in mirror_parts)
    with stage_bar(console, "embed", total, seconds) as advance:
        emb = np.concatenate([embed(embedder, x, advance=advance) for _, x, _ in index.parts])
        mirrored = {}
        for k in mirror_parts:
            m = embed(embedder, index.parts[k][1], mirror=True, advance=advance)
            mirrored.update(zip(range(int(index.offsets[k]), int(index.offsets[k + 1])), m))
    return emb, mirrored


def duplicates(index: Index, emb: np.ndarray, mirrored: dict, console: Console, seconds: dict) -> dict:
    """Near duplicates by embedding + pixel check, summarised with leakage first."""
    with stage_bar(console, "neighbours", len(emb) + len(mirrored), seconds) as advance:
        c = N.candidates(emb, mirrored, advance=advance)
    with stage_bar(console, "pixel check", 1, seconds) as advance:
        thumbs = torch.cat([N.thumbnails(x) for _, x, _ in index.parts])
        ncc = N.pixel_correlation(thumbs, c.i, c.j)
        rules = N.calibrate(thumbs, emb, c)
        keep = N.decide(c, ncc, rules)
        advance()
    rel = N.relative_distance(c)
    pairs = [(int(i), int(j), float(s), float(p), float(r))
             for i, j, s, p, r in zip(c.i[keep], c.j[keep], c.sim[keep], ncc[keep], rel[keep])]
    return {**summarise(pairs, index), "rules": rules, "candidates": int(len(c.i))}


def _leak_order(a: dict, b: dict, source: str) -> int:
    """0: test↔train (leakage into the score), 1: other splits, 2: within one split."""
    splits = {a["split"], b["split"]}
    return 0 if splits == {source, "test"} else 1 if len(splits) == 2 else 2


def summarise(pairs: list[tuple], index: Index) -> dict:
    """Counts per split and split pair, the held-out images with a train copy, and the pairs
    (test↔train first, then other splits, then within a split; closest pixels first). The first
    split of the index is the source of leaks: train, or the reference's train split."""
    source = index.parts[0][0]
    within, across, leaks = defaultdict(set), defaultdict(set), defaultdict(set)
    counts, listed, exclude = Counter(), [], {}
    for i, j, sim, ncc, rel in pairs:
        a, b = index.describe(i), index.describe(j)
        if source != "train" and b["split"].startswith("reference "):
            continue  # against a reference, only pairs that involve the audited images count
        if a["split"] == b["split"]:
            within[a["split"]].update((i, j))
            counts[a["split"]] += 1
        else:  # i < j: a is from the earlier split (train comes first)
            key = f"{a['split']}-{b['split']}"
            across[key].add(j)
            counts[key] += 1
            if a["split"] == source == "train":  # train without the copies of held-out images
                exclude.setdefault(image_id(index, i), f"copy of {b['split']} image {image_id(index, j)}")
            elif a["split"] == source:  # new images that the reference holds already
                exclude.setdefault(image_id(index, j), f"copy of {a['split']} image {image_id(index, i)}")
            if a["split"] == source:
                leaks[b["split"]].add(b["index"])
        if a["split"] == b["split"] == "train":
            exclude.setdefault(image_id(index, j), f"duplicate of {image_id(index, i)}")
        listed.append({"a": {**a, "id": image_id(index, i)}, "b": {**b, "id": image_id(index, j)},
                       "similarity": round(sim, 4), "ncc": round(ncc, 4), "relative_distance": round(rel, 4)})
    listed.sort(key=lambda e: (_leak_order(e["a"], e["b"], source), -e["ncc"]))
    return {"pairs": len(listed),
            "within": {s: {"images": len(v), "pairs": counts[s]} for s, v in within.items()},
            "across": {k: {"images": len(v), "pairs": counts[k]} for k, v in across.items()},
            "leaks": {s: sorted(v) for s, v in leaks.items()},
            "leak_ids": {s: [image_id(index, index.number(s, i)) for i in sorted(v)] for s, v in leaks.items()},
            "label_conflicts": sum(e["a"]["label"] != e["b"]["label"] for e in listed),
            "examples": listed[:MAX_LISTED], "exclude": exclude}


def label_errors(index: Index, emb: np.ndarray, console: Console, seconds: dict,
                 embedder: Embedder | None = None, hflip_ok: bool = True) -> dict | None:
    """Out-of-sample probabilities for every image, then cleanlab: the ranked list. Where the
    embedder is a classifier of these classes that never trained on a split (a run's test split),
    its own predictions are the out-of-sample probabilities there; every other image gets the
    K-fold probe on the embeddings, fitted on those images alone. cleanlab runs once per source:
    its per-class thresholds assume one model's calibration."""
    labels = np.concatenate([y for _, _, y in index.parts])
    rows = {s: np.arange(index.offsets[k], index.offsets[k + 1]) for k, (s, _, _) in enumerate(index.parts)}
    own = [s for s in rows if embedder is not None and embedder.probabilities is not None
           and s in embedder.held_out and embedder.classes == list(index.classes)]
    probed = np.concatenate([rows[s] for s in rows if s not in own] or [np.zeros(0, np.int64)])
    counts = np.bincount(labels[probed], minlength=len(index.classes))
    if len(probed) and (len(probed) < MIN_PROBE_IMAGES or (counts[counts > 0] < L.FOLDS).any()):
        return None  # too few images per class for K folds
    probs = np.zeros((len(labels), len(index.classes)))
    if len(probed):
        x = L.standardise(N.project(emb[probed]).numpy())  # ≤ 256 PCA dimensions: 5x cheaper steps than 1280
        with stage_bar(console, "probe", int(L.MAX_ITER * 1.25), seconds) as advance:
            probs[probed] = L.oof_probabilities(x, labels[probed], num_classes=len(index.classes), tick=advance)
    if own:
        with stage_bar(console, "predict", sum(len(rows[s]) for s in own), seconds) as advance:
            for s in own:
                probs[rows[s]] = embedder.probabilities(index.parts[list(rows).index(s)][1], hflip_ok)
                advance(len(rows[s]))
    with stage_bar(console, "cleanlab", 1, seconds) as advance:
        found = _issues_per_source(labels, probs, [r for r in (probed, *(rows[s] for s in own)) if len(r)])
        advance()
    sources = {s: "model" if s in own else "probe" for s in rows}
    accuracy = {s: round(float((found["suggested"][r] == labels[r]).mean()), 4) for s, r in rows.items() if len(r)}
    return {**_ranked(index, labels, found), "folds": L.FOLDS, "sources": sources, "accuracy": accuracy,
            "probe_accuracy": round(float((found["suggested"][probed] == labels[probed]).mean()), 4)
            if len(probed) else None}


def _issues_per_source(labels: np.ndarray, probs: np.ndarray, groups: list[np.ndarray]) -> dict:
    """label_issues' result over all images, cleanlab run on each group of rows apart: flagged ones
    first, by label quality, then the rest by label quality."""
    quality = np.zeros(len(labels))
    flagged = []
    for rows in groups:
        found = L.label_issues(labels[rows], probs[rows])
        quality[rows] = found["quality"]
        flagged.append(rows[found["flagged"]])
    flagged = np.concatenate(flagged or [np.zeros(0, np.int64)])
    flagged = flagged[np.argsort(quality[flagged], kind="stable")]
    rest = np.setdiff1d(np.arange(len(labels)), flagged)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return {"flagged": flagged.astype(np.int64), "rank": np.concatenate([flagged, rest]).astype(np.int64),
            "quality": quality, "suggested": probs.argmax(1)}


def _ranked(index: Index, labels: np.ndarray, found: dict) -> dict:
    """The ranking as audit.json lists it (the top), the whole table, and the train images to exclude."""
    rank = found["rank"][:MAX_LISTED]
    ranked = [{**index.describe(int(g)), "id": image_id(index, int(g)),
               "suggested": index.classes[int(found["suggested"][g])],
               "quality": round(float(found["quality"][g]), 4),
               "flagged": bool(k < len(found["flagged"]))} for k, g in enumerate(rank.tolist())]
    per_split = Counter(index.locate(int(g))[0] for g in found["flagged"].tolist())
    exclude = {image_id(index, int(g)): f"label {index.describe(int(g))['label']}, probably "
               f"{index.classes[int(found['suggested'][g])]}"
               for g in found["flagged"].tolist() if index.locate(int(g))[0] == "train"}
    table = [(image_id(index, g), index.locate(g)[0], index.classes[int(labels[g])],
              index.classes[int(found["suggested"][g])], round(float(found["quality"][g]), 5),
              int(k < len(found["flagged"]))) for k, g in enumerate(found["rank"].tolist())]
    return {"table": table, "exclude": exclude, "flagged": int(len(found["flagged"])),
            "flagged_per_split": dict(per_split), "ranked": ranked}


def mask_errors(index: Index, console: Console, seconds: dict) -> dict | None:
    """Segmentation masks that disagree with an out-of-sample per-pixel prediction (mask_issues.py),
    ranked. "predicted" holds the shown images' predicted grids (for the page, not audit.json)."""
    from cvrecipe.data import mask_issues as M

    total = sum(len(y) for _, _, y in index.parts)
    if total < MIN_MASK_IMAGES:
        return None
    with stage_bar(console, "mask probe", total, seconds) as advance:
        labels, probs = M.probe_parts(index.parts, len(index.classes), advance=advance)
    with stage_bar(console, "cleanlab", 1, seconds) as advance:
        found = M.mask_issues(labels, probs)
        advance()
    rank = found["rank"][:MAX_LISTED].tolist()
    ranked = [{**index.describe(g), "id": image_id(index, g), "quality": round(float(found["quality"][g]), 4),
               "issue_share": round(float(found["issue_share"][g]), 4),
               "disagreement": round(float(found["disagreement"][g]), 4), "flagged": bool(found["flagged"][g])}
              for g in rank]
    flagged = np.flatnonzero(found["flagged"]).tolist()
    exclude = {image_id(index, g): f"mask disagrees with the out-of-sample prediction on "
               f"{found['disagreement'][g]:.0%} of its pixels" for g in flagged if index.locate(g)[0] == "train"}
    return {"folds": L.FOLDS, "grid": M.GRID, "flag_share": round(found["flag_share"], 4), "flagged": len(flagged),
            "flagged_per_split": dict(Counter(index.locate(g)[0] for g in flagged)),
            "agreement": round(float(1 - found["disagreement"].mean()), 4), "ranked": ranked,
            "exclude": exclude, "predicted": {g: found["predicted"][g] for g in rank[:SHOWN_MASKS]}}


def run(index: Index, embedder: Embedder, console: Console, labels: bool = True, hflip_ok: bool = True) -> dict:
    """All stages over the images of `index`; returns the audit.json section. Without class
    labels (segmentation masks), the masks are ranked instead (mask_errors). `hflip_ok`: may the
    images be mirrored and keep their label (the embedder's own predictions may then average the mirror)."""
    seconds: dict[str, float] = {}
    emb, mirrored = embed_parts(index, embedder, console, seconds)
    out = {"embedder": embedder.name, "dimensions": int(emb.shape[1]), "mirrored": len(mirrored),
           "near_duplicates": duplicates(index, emb, mirrored, console, seconds)}
    out["label_issues"] = label_errors(index, emb, console, seconds, embedder, hflip_ok) if labels else None
    masks = not labels and all(y.ndim == 3 for _, _, y in index.parts)
    out["mask_issues"] = mask_errors(index, console, seconds) if masks else None
    out["seconds"] = seconds
    return out


def write_lists(result: dict, out_dir: Path) -> None:
    """exclude.txt: train copies of held-out images, the second image of each duplicate pair within
    train, and flagged label errors in train; leaks.txt: held-out images with a copy in train."""
    reasons = {**result["near_duplicates"]["exclude"], **(result["label_issues"] or {}).get("exclude", {}),
               **(result.get("mask_issues") or {}).get("exclude", {})}
    lines = [f"{k}  # {v}" for k, v in reasons.items()]
    (out_dir / "exclude.txt").write_text("\n".join(["# images to train without: data.exclude=this file", *lines]) + "\n")
    table = (result["label_issues"] or {}).pop("table", None)
    if table is not None:  # the whole ranking, most likely label error first (audit.json lists the top)
        with open(out_dir / "label_issues.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "split", "label", "suggested", "quality", "flagged"])
            writer.writerows(table)
    leaks = [i for ids in result["near_duplicates"]["leak_ids"].values() for i in ids]
    (out_dir / "leaks.txt").write_text("\n".join(["# held-out images with a near copy in train", *leaks]) + "\n")


def embedder_for(spec: "str | Embedder", size: int = 64) -> Embedder:
    """`lite0` → the pretrained EfficientNet-Lite0 at `size` px; an Embedder (e.g. a run's features,
    cvrecipe.artifact.features.run_embedder, built by the caller) is used as given."""
    from cvrecipe.data.embed import lite0_embedder

    if isinstance(spec, Embedder):
        return spec
    if spec != "lite0":
        raise ValueError(f"embedder '{spec}': expected 'lite0' or an Embedder")
    return lite0_embedder(size)


def reference_index(ds, names: dict | None, reference: str, cfg) -> Index:
    """One index over a reference dataset's splits (named "reference SPLIT", first) and `ds`'s: pairs
    across them are images of `ds` already in the reference. Labels are mapped by class name."""
    import dataclasses

    from cvrecipe.data import load_source
    from cvrecipe.data.audit import split_parts
    from cvrecipe.data.dataset import DataError
    from cvrecipe.data.exclusions import folder_names

    ref = load_source(reference, dataclasses.replace(cfg.data, name=reference, image_size=ds.image_shape[-1],
                                                     channels=ds.image_shape[0]))
    unknown = sorted(set(ds.classes) - set(ref.classes))
    if unknown:
        raise DataError(f"{ds.name}: classes {unknown} are not classes of the reference {reference}")
    to_ref = np.array([ref.classes.index(c) for c in ds.classes], np.int64)
    parts = [(f"reference {s}", x, y) for s, x, y in split_parts(ref)]
    parts += [(s, x, to_ref[y]) for s, x, y in split_parts(ds)]
    ref_names = (folder_names(Path(reference[len("folder:"):]), ref) if reference.startswith("folder:") else None) or {}
    all_names = {**{f"reference {s}": v for s, v in ref_names.items()}, **(names or {})}
    return Index(None, all_names or None, parts=parts, classes=ref.classes)


def record(name: str, cfg, ds, result: dict, out_dir: Path) -> None:
    """Store the test split's leaks in the cache, where `eval` and the sanity checks look."""
    from cvrecipe.data.cache import cache_root
    from cvrecipe.data.exclusions import write_record

    if ds.test is None:
        return
    leaks = result["near_duplicates"]["leaks"].get("test", [])
    write_record(cache_root(cfg.data.cache_dir), name, len(ds.test), leaks, out_dir.resolve())
