"""The data report's embedding-audit sections: near-duplicate pairs side by side (test↔train
leakage first) and the ranked likely label errors as an image grid with given → suggested class."""
from __future__ import annotations

import numpy as np

from cvrecipe import pages
from cvrecipe.data.audit import Index

PAIRS_SHOWN = 48  # pairs with thumbnails (all are in audit.json, up to its limit)
ERRORS_SHOWN = 60  # ranked label-error candidates with thumbnails


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
