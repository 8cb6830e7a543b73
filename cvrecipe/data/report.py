"""`cvrecipe data inspect DATA`: audit a dataset and write OUT/audit.json + OUT/report.html.

The report is one self-contained HTML file (images embedded), readable offline: class balance,
original sizes and modes, pixel statistics, unreadable files, duplicates and train/test leakage
with thumbnails side by side, random samples per class, and a batch exactly as the model will
see it after the recipe's preprocessing and augmentation.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console

from cvrecipe import pages
from cvrecipe.config import Config, load_config
from cvrecipe.data import ImageDataset, load_dataset, load_source
from cvrecipe.data import audit as A
from cvrecipe.data.augment import augment_batch

SAMPLES_PER_CLASS = 10  # random training images shown per class
MODEL_VIEW = 24  # training images shown as the model sees them
# (config, dataset) → the Normalize module of the model the recipe would build (cvrecipe.artifact.build)
Normalizer = Callable[[Config, ImageDataset], torch.nn.Module]
PAIRS_SHOWN = 12  # duplicate pairs with thumbnails per kind
MAX_FILES_LISTED = 200  # unreadable files listed in the page (all are in audit.json)


def audit_dataset(name: str, cfg: Config, console: Console | None = None, embed=None,
                  reference: str | None = None, embed_size: int = 64,
                  normalizer: Normalizer | None = None) -> tuple[dict, dict]:
    """(audit dict for audit.json, images for the page). `cfg` supplies preprocessing/augmentation.
    `embed` ("lite0" or a run folder) adds the embedding audit (embedding_audit.py); `reference`
    audits `name` against another dataset (e.g. a `monitor export` folder against the training set)."""
    console = console or Console(soft_wrap=True)
    t0 = time.perf_counter()
    ds = load_source(name, dataclasses.replace(cfg.data, name=name, image_size=None, channels=None))
    console.print(f"{ds.name}: loaded in {time.perf_counter() - t0:.1f}s; auditing "
                  f"{sum(len(y) for _, _, y in A.split_parts(ds)):,} images")
    names, headers = (A.folder_files(Path(name[len("folder:"):]), ds) if name.startswith("folder:")
                      else ({s: getattr(ds, s).names for s in A.SPLITS if getattr(ds, s) is not None}, None)
                      if ds.masks else (None, None))
    dups = A.find_duplicates(ds, names)
    index = dups.pop("index")
    embedding = None
    if embed:
        from cvrecipe.data import embedding_audit as E

        audit_index = E.reference_index(ds, names, reference, cfg) if reference else index
        embedding = E.run(audit_index, E.embedder_for(embed, embed_size), console, labels=not ds.masks,
                          hflip_ok=ds.hflip_ok)
    # the predicted masks of the shown mask label-error candidates are for the page, not audit.json
    predicted = ((embedding or {}).get("mask_issues") or {}).pop("predicted", {})
    audit = {
        "dataset": ds.name, "classes": ds.classes, "decoded_shape": list(ds.image_shape),
        "splits": A.class_balance(ds),
        "files": headers,  # None for registered datasets: they ship arrays, not files
        "channel_stats": {s: A.channel_stats(x) for s, x, _ in A.split_parts(ds)},
        "unreadable": [{"file": f, "reason": r} for f, r in ds.skipped],
        "exact_duplicates": dups["exact"], "near_duplicates": dups["near"],
        "embedding": embedding, "reference": reference,
    }
    if embedding is not None:
        index = audit_index  # the page shows the embedding audit's images (with the reference's, if any)
    if ds.masks:  # segmentation: pairs through the paired augmentation
        from cvrecipe.data.mask_report import model_view as pair_view

        view = pair_view(cfg, name)
        audit["model_input"] = {"image_shape": view["image_shape"], "augment": view["augment"]}
        audit["seconds"] = round(time.perf_counter() - t0, 2)
        return audit, {"ds": ds, "index": index, "view": view, "predicted": predicted}
    # against a reference (a monitor export: often a handful of images, no test split) the page is
    # about the new images and their copies; the model's view is the reference's concern
    view = model_view(cfg, name, normalizer=normalizer) if normalizer is not None and not reference else None
    audit["model_input"] = {k: v for k, v in view.items() if not isinstance(v, torch.Tensor)} if view else None
    audit["seconds"] = round(time.perf_counter() - t0, 2)
    return audit, {"ds": ds, "index": index, "view": view}


def model_view(cfg: Config, name: str, n: int = MODEL_VIEW, *, normalizer: Normalizer) -> dict:
    """A training batch through the real pipeline: load_dataset (resize, channels, val split) →
    augmentation → the model's own Normalize (from `normalizer`, which builds the recipe's model: the
    caller's, as models are built above this layer); then de-normalised back to pixels for display."""
    data_cfg = dataclasses.replace(cfg.data, name=name)
    ds = load_dataset(data_cfg, seed=cfg.train.seed)
    with torch.random.fork_rng():  # building the model draws weights; leave the caller's RNG alone
        normalize = normalizer(dataclasses.replace(cfg, data=data_cfg), ds)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.from_numpy(ds.train.x[torch.randperm(len(ds.train), generator=gen)[:n].numpy()])
    draws, stats = [], []
    with torch.no_grad():
        for _ in range(2):  # two draws show what the augmentation varies
            net_input = normalize(augment_batch(x, cfg.augment, ds.hflip_ok, gen))  # (n, C, H, W) float
            stats.append({"mean": net_input.mean((0, 2, 3)).tolist(), "std": net_input.std((0, 2, 3)).tolist()})
            pixels = (net_input * normalize.std + normalize.mean).mul(255).round().clamp(0, 255)
            draws.append(pixels.to(torch.uint8))
    return {"image_shape": list(ds.image_shape), "hflip_ok": ds.hflip_ok, "augment": dataclasses.asdict(cfg.augment),
            "normalize_mean": normalize.mean.flatten().tolist(), "normalize_std": normalize.std.flatten().tolist(),
            "batch_stats_after_normalize": stats, "original": x, "draw1": draws[0], "draw2": draws[1]}


def inspect_data(name: str, out_dir: Path, recipe: str | None = None, overrides: list[str] | None = None,
                 console: Console | None = None, embed=None, reference: str | None = None,
                 embed_size: int = 64, normalizer: Normalizer | None = None) -> dict:
    """Audit `name` and write out_dir/audit.json and out_dir/report.html (with `embed`, also
    exclude.txt and leaks.txt, and the leak record `eval` reads). `embed`: "lite0" or an Embedder;
    `normalizer(cfg, ds)` → the recipe's model's Normalize, for the page's model-input view (none
    without it). Returns the audit."""
    console = console or Console(soft_wrap=True)
    cfg = load_config(recipe, overrides) if recipe or overrides else Config()
    audit, images = audit_dataset(name, cfg, console, embed, reference, embed_size, normalizer)
    audit["recipe"] = recipe
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if audit["embedding"] is not None:
        from cvrecipe.data import embedding_audit as E

        E.write_lists(audit["embedding"], out_dir)
        if not reference:
            E.record(name, cfg, images["ds"], audit["embedding"], out_dir)
    (out_dir / "audit.json").write_text(json.dumps(audit, indent=1))
    (out_dir / "report.html").write_text(render(audit, images))
    _print_summary(audit, out_dir, console)
    return audit


def _print_summary(audit: dict, out_dir: Path, console: Console) -> None:
    for split, info in audit["splits"].items():
        console.print(f"  {split:5s} {info['images']:>7,} images, imbalance ratio {info['imbalance_ratio']:.2f}")
    ex, near = audit["exact_duplicates"], audit["near_duplicates"]
    leaks = {k: v["images"] for k, v in ex["across"].items()}
    console.print(f"  unreadable files: {len(audit['unreadable'])}   exact duplicate groups: {ex['groups']}"
                  f" (across splits: {leaks or 0})   near-duplicate pairs: {near['pairs']}"
                  f" (across splits: {({k: v['images'] for k, v in near['across'].items()}) or 0})")
    emb = audit.get("embedding")
    if emb is not None:
        nd, li, mi = emb["near_duplicates"], emb["label_issues"], emb.get("mask_issues")
        errors = (f"likely label errors: {li['flagged']}" if li else
                  f"likely mask errors: {mi['flagged']}" if mi else "likely label errors: not ranked")
        console.print(f"  by embedding: {nd['pairs']:,} near-duplicate pairs, across splits "
                      f"{ {k: v['images'] for k, v in nd['across'].items()} or 0}; {errors}; "
                      "wrote exclude.txt and leaks.txt")
    console.print(f"audit took {audit['seconds']:.1f}s; wrote {out_dir / 'report.html'} and {out_dir / 'audit.json'}")


# ---------------------------------------------------------------------------------------- page


def render(audit: dict, images: dict) -> str:
    ds, index, view = images["ds"], images["index"], images["view"]
    body = [_overview(audit), _balance(audit), _files(audit), _unreadable(audit),
            _duplicates("Exact duplicates", audit["exact_duplicates"], index,
                        "identical decoded pixels; groups are linked to their first member in each split"),
            _duplicates("Near duplicates", audit["near_duplicates"], index,
                        f"8×8 thumbnails correlate ≥ {audit['near_duplicates']['min_corr']} and up-to-32×32 "
                        f"thumbnails differ by ≤ {audit['near_duplicates']['max_rms']} RMS (brightness and "
                        "contrast removed): re-encoded, resized or re-toned copies"),
            *_embedding(audit, index, ds, images.get("predicted", {})), *_examples(ds, audit, view)]
    subtitle = (f"{len(audit['classes'])} classes, decoded (C, H, W) = {tuple(audit['decoded_shape'])}; "
                f"audited in {audit['seconds']:.1f}s")
    return pages.page(f"Data report: {audit['dataset']}", subtitle, body)


def _embedding(audit: dict, index: A.Index, ds: ImageDataset, predicted: dict) -> list[str]:
    info = audit.get("embedding")
    if info is None:
        return []
    from cvrecipe.data import embedding_report as R

    if ds.masks:
        return [R.duplicates_section(info["near_duplicates"], index, info["embedder"]),
                R.mask_errors_section(info.get("mask_issues"), index, predicted, ds.colours)]
    return [R.duplicates_section(info["near_duplicates"], index, info["embedder"]),
            R.label_errors_section(info["label_issues"], index)]


def _examples(ds: ImageDataset, audit: dict, view: dict) -> list[str]:
    if ds.masks:
        from cvrecipe.data import mask_report

        return [mask_report.samples(ds), mask_report.model_view_section(view)]
    return [_samples(ds), _model_view(audit, view)] if view is not None else [_samples(ds)]


def _overview(audit: dict) -> str:
    ex, near = audit["exact_duplicates"], audit["near_duplicates"]
    total = sum(s["images"] for s in audit["splits"].values())
    leaked = sum(v["images"] for v in ex["across"].values()) + sum(v["images"] for v in near["across"].values())
    return pages.cards([
        (f"{total:,}", "images"), (str(len(audit["classes"])), "classes"),
        (" / ".join(f"{s['images']:,}" for s in audit["splits"].values()), " / ".join(audit["splits"])),
        (str(len(audit["unreadable"])), "unreadable files"), (str(ex["groups"]), "exact duplicate groups"),
        (f"{near['pairs']:,}", "near-duplicate pairs"), (f"{leaked:,}", "images leaking across splits"),
    ])


def _balance(audit: dict) -> str:
    splits = audit["splits"]
    header = ["class", *splits]
    rows = [[c, *(splits[s]["class_counts"][c] for s in splits)] for c in audit["classes"]]
    rows.append(["imbalance ratio (max/min)", *(f"{splits[s]['imbalance_ratio']:.2f}" for s in splits)])
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(splits)
    x = np.arange(len(audit["classes"]))
    for k, s in enumerate(splits):
        ax.bar(x + k * width, [splits[s]["class_counts"][c] for c in audit["classes"]], width, label=s)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, audit["classes"], rotation=30, ha="right", fontsize=8)
    unit = next(iter(splits.values())).get("unit", "images")  # pixels, for segmentation masks
    ax.set_ylabel(unit)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{unit} per class")
    stats = audit["channel_stats"]
    stat_rows = [[s, *(f"{m:.4f} ± {d:.4f}" for m, d in zip(v["mean"], v["std"]))] for s, v in stats.items()]
    channels = len(next(iter(stats.values()))["mean"])
    names = ["gray"] if channels == 1 else ["R", "G", "B"][:channels]
    if unit == "pixels":
        rows.insert(-1, ["unlabelled (255)", *(splits[s]["unlabelled_pixels"] for s in splits)])
        rows.append(["images", *(splits[s]["images"] for s in splits)])
    title = "Class balance" if unit == "images" else f"Class balance ({unit})"
    return (f"<h2>{title}</h2>" + pages.img(pages.figure_png(fig), f"{unit} per class")
            + pages.table(header, rows) + "<h2>Pixel statistics</h2>"
            + '<p class="note">per-channel mean ± std of the decoded pixels, in [0, 1] units</p>'
            + pages.table(["split", *names], stat_rows))


def _files(audit: dict) -> str:
    files = audit["files"]
    if not files:
        return ("<h2>Image files</h2><p class='note'>a registered dataset: it ships decoded arrays, not image "
                f"files; every image is (C, H, W) = {tuple(audit['decoded_shape'])}</p>")
    tables = "".join(f"<div><h3>{key}</h3>{pages.table([key[:-1], 'files'], list(files[key].items())[:15])}</div>"
                     for key in ("sizes", "modes", "formats"))
    html = ("<h2>Image files</h2><p class='note'>from the file headers, before any decoding or resizing; decoded "
            f"images are (C, H, W) = {tuple(audit['decoded_shape'])}</p>")
    if all(len(files[key]) <= 1 for key in ("sizes", "modes", "formats")):
        return html + f'<div class="pairs">{tables}</div>'  # one size, one mode: a chart adds nothing
    fig = Figure(figsize=(9, 2.8))
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("sizes", "modes", "formats")):
        items = list(files[key].items())[:12]
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
        ax.set_title(f"original {key} (W×H)" if key == "sizes" else f"original {key}", fontsize=10)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    chart = pages.img(pages.figure_png(fig), "original sizes, modes and formats")
    return html + chart + f'<div class="pairs">{tables}</div>'


def _unreadable(audit: dict) -> str:
    bad = audit["unreadable"]
    if not bad:
        return "<h2>Unreadable files</h2><p>none: every file decoded.</p>"
    rows = [[b["file"], b["reason"]] for b in bad[:MAX_FILES_LISTED]]
    extra = len(bad) - MAX_FILES_LISTED
    more = f"<p class='note'>… and {extra} more in audit.json</p>" if extra > 0 else ""
    return (f"<h2>Unreadable files ({len(bad)})</h2>"
            "<p class='note'>skipped by the decoder; training never sees them</p>"
            + pages.table(["file", "reason"], rows, ["bad"] * len(rows), left=2) + more)


def _duplicates(title: str, info: dict, index: A.Index, how: str) -> str:
    rows = [[s, v["images"], v["pairs"]] for s, v in info["within"].items()]
    rows += [[f"{k} (leakage: images of the second split with a copy in the first)", v["images"], v["pairs"]]
             for k, v in info["across"].items()]
    html = f"<h2>{title}</h2><p class='note'>{pages.esc(how)}</p>"
    if not rows:
        return html + "<p>none found.</p>"
    html += pages.table(["where", "images", "pairs"], rows, ["bad" if "leakage" in str(r[0]) else "" for r in rows])
    html += f"<p>pairs with different labels: <b>{info['label_conflicts']}</b></p>"
    return html + _pair_gallery(info["examples"][:PAIRS_SHOWN], index)


def _caption(d: dict) -> str:
    where = pages.esc(d["file"]) if d.get("file") else f"{d['split']} #{d['index']}"
    return f"<b>{pages.esc(d['label'])}</b> · {where}"


def _pair_gallery(examples: list[dict], index: A.Index) -> str:
    figures = []
    for e in examples:
        a, b = (index.number(e[k]["split"], e[k]["index"]) for k in ("a", "b"))
        pair = np.stack([index.image(a), index.image(b)])
        png = pages.array_png(pages.tile(pair, 2, gap=2), pages.display_scale(pair.shape[-1], 72))
        extra = f"<br>rms {e['rms']}" if "rms" in e else ""
        conflict = ' class="conflict"' if e["a"]["label"] != e["b"]["label"] else ""
        figures.append(f"<figure{conflict}>{pages.img(png, 'duplicate pair', pixelated=True, cls='thumb')}"
                       f"<figcaption>{_caption(e['a'])}<br>{_caption(e['b'])}{extra}</figcaption></figure>")
    return f'<div class="pairs">{"".join(figures)}</div>'


def _samples(ds: ImageDataset) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for label, cls in enumerate(ds.classes):
        idx = np.flatnonzero(ds.train.y == label)
        pick = rng.choice(idx, min(SAMPLES_PER_CLASS, len(idx)), replace=False) if len(idx) else idx
        if len(pick):
            images = ds.train.x[np.sort(pick)]
            png = pages.array_png(pages.tile(images, SAMPLES_PER_CLASS), pages.display_scale(images.shape[-1], 56))
            rows.append(f"<tr><td class=l>{pages.esc(cls)}</td><td class=l>"
                        f"{pages.img(png, f'samples of {cls}', pixelated=True, cls='thumb')}</td></tr>")
    return (f"<h2>Random training samples per class</h2><table><tbody>{''.join(rows)}</tbody></table>")


def _model_view(audit: dict, view: dict) -> str:
    info = audit["model_input"]
    scale = pages.display_scale(view["original"].shape[-1], 56)
    grids = [(k, pages.array_png(pages.tile(view[k].numpy(), 12), scale)) for k in ("original", "draw1", "draw2")]
    titles = {"original": "as stored (after resizing / channel conversion)", "draw1": "as the model sees them: draw 1",
              "draw2": "draw 2 (same images, new augmentation)"}
    augment = ", ".join(f"{k}={v}" for k, v in info["augment"].items())
    stats = "; ".join(f"draw {i + 1}: mean {np.round(s['mean'], 3).tolist()}, std {np.round(s['std'], 3).tolist()}"
                      for i, s in enumerate(info["batch_stats_after_normalize"]))
    mean, std = np.round(info["normalize_mean"], 4).tolist(), np.round(info["normalize_std"], 4).tolist()
    identity = all(m == 0 for m in mean) and all(d == 1 for d in std)
    norm = "pixels rescaled to [0, 1], not standardised" if identity else f"standardised with mean {mean}, std {std}"
    return ("<h2>What the model sees</h2>"
            f"<p class='note'>input {tuple(info['image_shape'])}; augmentation: {pages.esc(augment)} "
            f"(horizontal flips {'allowed' if info['hflip_ok'] else 'not allowed'} for this dataset); {norm}, "
            f"then de-normalised back to pixels for display. Network input statistics — {pages.esc(stats)}.</p>"
            + "".join(f"<h3>{titles[k]}</h3>{pages.img(png, titles[k], pixelated=True, cls='thumb')}"
                      for k, png in grids))
