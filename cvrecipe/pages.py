"""Self-contained HTML pages: one stylesheet, escaped tables, images embedded as data URIs.

A page written here opens offline in any browser and can be mailed or archived as one file.
Figures are drawn with matplotlib's object API (`Figure`, Agg canvas) rather than pyplot, so
nothing here touches matplotlib's global backend or figure registry.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 16px 24px 48px; color: #1d2330; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #dde2ea; padding-bottom: 4px;
     margin-top: 1.8em; } h3 { margin-bottom: 0.3em; }
.sub { color: #5b6578; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #dde2ea; padding: 3px 9px; text-align: right; }
th { background: #f2f4f8; } td.l, th.l { text-align: left; }
tr.bad td { background: #fdecec; } tr.warn td { background: #fff7e0; } tr.good td { background: #eaf7ee; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { border: 1px solid #dde2ea; border-radius: 6px; padding: 8px 14px; min-width: 96px; }
.card b { display: block; font-size: 1.35em; } .card span { color: #5b6578; font-size: 0.85em; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eef0f4; }
img.px { image-rendering: pixelated; } img.thumb { border: 1px solid #dde2ea; }
.pairs { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; padding: 6px; border: 1px solid #dde2ea; border-radius: 6px; text-align: center; }
figure.conflict { border-color: #d9534f; background: #fdecec; }
figcaption { font-size: 0.78em; color: #3b4457; max-width: 270px; overflow-wrap: anywhere; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.note { color: #5b6578; font-size: 0.9em; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: int | None = None, pixelated: bool = False, cls: str = "plot") -> str:
    size = f' width="{width}"' if width else ""
    classes = f"{cls} px" if pixelated else cls
    return f'<img class="{classes}" alt="{esc(alt)}" src="{data_uri(png)}"{size}>'


def figure_png(fig: Figure, path: Path | None = None, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib Figure (also written to `path` when given)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    png = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


def array_png(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a uint8 image, (C, H, W) with C in {1, 3} or (H, W), enlarged `scale`× (nearest)."""
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def tile(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """(N, C, H, W) uint8 → one (C, rows·(H+gap), columns·(W+gap)) mosaic on a white background."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // columns))
    out = np.full((c, rows * (h + gap) - gap, columns * (w + gap) - gap), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[:, r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    return out


def display_scale(size: int, target: int = 64) -> int:
    """Integer enlargement that brings a `size`-pixel image near `target` pixels (8×8 digits → 8×)."""
    return max(1, round(target / max(1, size)))


def table(header: list[str] | None, rows: list[list], row_classes: list[str] | None = None, left: int = 1) -> str:
    """An HTML table (no header row when `header` is None); the first `left` columns are left-aligned
    (labels), the rest right-aligned (numbers)."""
    def cells(values, tag):
        return "".join(f'<{tag}{" class=l" if i < left else ""}>{esc(v)}</{tag}>' for i, v in enumerate(values))

    classes = row_classes or [""] * len(rows)
    body = "".join(f'<tr class="{c}">{cells(r, "td")}</tr>' for r, c in zip(rows, classes))
    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>" if header is not None else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def cards(items: list[tuple[str, str]]) -> str:
    """Headline numbers as small boxes: [(value, label)]."""
    return '<div class="cards">' + "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                                           for v, k in items) + "</div>"


def page(title: str, subtitle: str, body: list[str]) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>{"".join(body)}</body></html>\n')
