"""The data report's embedding-audit sections: near-duplicate pairs side by side (test↔train
leakage first) and the ranked likely label errors as an image grid with given → suggested class
(for segmentation: image, given mask and out-of-sample predicted mask)."""
from __future__ import annotations

import numpy as np

from cvrecipe import pages
from cvrecipe.data.audit import Index
from cvrecipe.data import mask_issues as M
from cvrecipe.data.mask_images import class_colours, colour_mask

PAIRS_SHOWN = 48  # pairs with thumbnails (all are in audit.json, up to its limit)
ERRORS_SHOWN = 60  # ranked label-error candidates with thumbnails
MASK_SIDE = 128  # px: mask label-error candidates larger than this are shown subsampled


def _thumb(images: np.ndarray, alt: str) -> str:
    png = pages.array_png(pages.tile(images, len(images), gap=2), pages.display_scale(images.shape[-1], 72))
    return pages.img(png, alt, pixelated=True, cls="thumb")


def _where(d: dict) -> str:
    return pages.esc(d.get("id") or f"{d['split']}:{d['index']}")


def duplicates_section(info: dict, index: Index, embedder: str) -> str:
    rules = info["rules"]
    how = (f"{pages.esc(embedder)} embeddings: each image's {rules['k']} nearest neighbours (mirror included "
           f"across splits), {info['candidates']:,} candidate pairs checked on 32×32 grayscale pixels "
           f"(normalised cross-correlation, best over the mirror and shifts up to ±2 px). A pair is a duplicate "
           f"when its correlation less {rules['rel_weight']} × its embedding distance relative to the "
           f"{rules['k']}th neighbour's is ≥ {rules['score_threshold']}: more than {rules['null_quantile']:.1%} of "
           f"{rules['null_pairs']:,} image/{rules['k']}th-neighbour pairs of this dataset reach (at least "
           f"{rules['min_score']}).")
    rows = [[f"{k} (leakage: images of the second split with a copy in the first)", v["images"], v["pairs"]]
            for k, v in info["across"].items()]
    rows += [[f"within {s}", v["images"], v["pairs"]] for s, v in info["within"].items()]
    html = f"<h2>Near duplicates by embedding</h2><p class='note'>{how}</p>"
    if not rows:
        return html + "<p>none found.</p>"
    html += pages.table(["where", "images", "pairs"], rows, ["bad" if "leakage" in r[0] else "" for r in rows])
    html += f"<p>pairs with different labels: <b>{info['label_conflicts']}</b></p>"
    figures = []
    for e in info["examples"][:PAIRS_SHOWN]:
        a, b = (index.number(e[k]["split"], e[k]["index"]) for k in ("a", "b"))
        conflict = ' class="conflict"' if e["a"]["label"] != e["b"]["label"] else ""
        figures.append(f"<figure{conflict}>{_thumb(np.stack([index.image(a), index.image(b)]), 'duplicate pair')}"
                       f"<figcaption><b>{pages.esc(e['a']['label'])}</b> · {_where(e['a'])}<br>"
                       f"<b>{pages.esc(e['b']['label'])}</b> · {_where(e['b'])}<br>"
                       f"cos {e['similarity']:.3f} · ncc {e['ncc']:.3f}</figcaption></figure>")
    return html + f'<div class="pairs dup-pairs">{"".join(figures)}</div>'


def _sources(info: dict) -> str:
    """Where each split's probabilities came from, with the accuracy of their most probable class."""
    said = {"probe": f"a {info['folds']}-fold logistic-regression probe on the embeddings",
            "model": "the model's own predictions (it never trained on them)"}
    sources = info.get("sources") or {}
    return "; ".join(f"{pages.esc(s)}: {said[how]}, accuracy {info['accuracy'][s]:.1%}"
                     for s, how in sources.items() if s in info.get("accuracy", {}))


def label_errors_section(info: dict | None, index: Index) -> str:
    if info is None:
        return ("<h2>Likely label errors</h2><p class='note'>not ranked: too few images per class for a "
                "5-fold probe, or no class labels (segmentation)</p>")
    how = (f"out-of-sample probabilities ({_sources(info)}), then confident learning (cleanlab): "
           f"<b>{info['flagged']:,}</b> images flagged ({', '.join(f'{s} {n:,}' for s, n in info['flagged_per_split'].items()) or 'none'}); "
           "shown most likely first, with the given and the suggested class")
    figures = []
    for r in info["ranked"][:ERRORS_SHOWN]:
        if not r["flagged"]:
            break
        g = index.number(r["split"], r["index"])
        figures.append(f"<figure>{_thumb(index.image(g)[None], 'label error candidate')}<figcaption>"
                       f"{_where(r)}<br>given <b>{pages.esc(r['label'])}</b> → <b>{pages.esc(r['suggested'])}</b>"
                       f"<br>quality {r['quality']:.3f}</figcaption></figure>")
    grid = f'<div class="pairs label-errors">{"".join(figures)}</div>' if figures else "<p>none flagged.</p>"
    return f"<h2>Likely label errors</h2><p class='note'>{how}</p>{grid}"


def mask_errors_section(info: dict | None, index: Index, predicted: dict, colours: list | None) -> str:
    """The masks ranked by disagreement with the out-of-sample prediction: image, given mask and
    predicted mask side by side (predicted on the probe's grid, shown at the image's size)."""
    if info is None:
        return ("<h2>Likely mask errors</h2><p class='note'>not ranked: too few images for a "
                "K-fold probe</p>")
    how = (f"out-of-sample per-pixel predictions from a {info['folds']}-fold logistic-regression probe on "
           f"EfficientNet-Lite0's feature maps, on a {info['grid']}×{info['grid']} grid per image (agreeing "
           f"with the given masks on {info['agreement']:.1%} of labelled cells, averaged over images), then "
           "cleanlab.segmentation: ranked by its label quality score (softmin over the pixels), lowest first; <b>"
           f"{info['flagged']:,}</b> images flagged, where confident learning marks ≥ {info['flag_share']:.1%} "
           f"of the pixels ({M.MIN_ISSUE_SHARE:.0%}, or {M.TYPICAL_TIMES:g}× the median image's share if more) "
           f"({', '.join(f'{s} {n:,}' for s, n in info['flagged_per_split'].items()) or 'none'}). Each: image · "
           "given mask · predicted mask")
    table = class_colours(len(index.classes), colours)
    figures = []
    for r in info["ranked"]:
        g = index.number(r["split"], r["index"])
        if g not in predicted:
            break
        image, given = index.image(g), index.parts[[p[0] for p in index.parts].index(r["split"])][2][r["index"]]
        shown = np.stack([np.repeat(image, 3, 0) if image.shape[0] == 1 else image, colour_mask(given, table),
                          colour_mask(_upsample(predicted[g], given.shape), table)])
        step = -(-max(given.shape) // MASK_SIDE)  # large images shown at about MASK_SIDE px
        shown = np.ascontiguousarray(shown[..., ::step, ::step])
        flag = ' class="conflict"' if r["flagged"] else ""
        figures.append(f"<figure{flag}>{_thumb(shown, 'mask error candidate')}<figcaption>{_where(r)}<br>"
                       f"quality {r['quality']:.3f} · disagree {r['disagreement']:.1%} · "
                       f"marked {r['issue_share']:.1%}</figcaption></figure>")
    grid = f'<div class="pairs mask-errors">{"".join(figures)}</div>' if figures else "<p>no images.</p>"
    return f"<h2>Likely mask errors</h2><p class='note'>{how}</p>{grid}"


def _upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(G, G) class indices → (H, W), each pixel taking its grid cell's class."""
    rows = np.minimum((np.arange(shape[0]) * grid.shape[0]) // shape[0], grid.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * grid.shape[1]) // shape[1], grid.shape[1] - 1)
    return grid[rows[:, None], cols[None, :]]
