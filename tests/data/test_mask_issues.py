"""Likely mask errors on generated segmentation data: `data inspect --embed` over shapes pairs with
four planted mask corruptions (an object shifted, erased, relabelled, and one added where there is
nothing) ranks those four first, lists the train ones in exclude.txt, and the page's grid of
image · given mask · predicted mask renders in Chromium."""
import json

import numpy as np
import pytest
from PIL import Image

from cvrecipe.cli import main
from cvrecipe.data import embedding_audit as E

from conftest import shapes_pair
from pagecheck import view_page

SIZE, COUNT = 48, 24


def corrupt(mask: np.ndarray, how: str) -> np.ndarray:
    """A plausible annotation mistake on a shapes mask (0 background, 1 disc, 2 square)."""
    out = mask.copy()
    if how == "shifted":  # every object drawn a third of the image to the right
        return np.roll(out, SIZE // 3, axis=1)
    if how == "erased":  # the discs left unlabelled as background
        out[out == 1] = 0
    elif how == "relabelled":  # discs and squares swapped
        out[mask == 1], out[mask == 2] = 2, 1
    elif how == "added":  # a square labelled where the image has none
        out[2:2 + SIZE // 3, 2:2 + SIZE // 3] = 2
    return out


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks") / "shapes"
    rng = np.random.default_rng(0)
    planted = {3: "shifted", 8: "erased", 13: "relabelled", 19: "added"}
    for kind in ("image", "label"):
        (root / "train" / kind).mkdir(parents=True)
    for i in range(COUNT):
        image, mask = shapes_pair(SIZE, rng)
        Image.fromarray(image).save(root / "train" / "image" / f"{i:02d}.png")
        given = corrupt(mask, planted[i]) if i in planted else mask
        Image.fromarray(given).save(root / "train" / "label" / f"{i:02d}.png")
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVRECIPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["data", "inspect", f"masks:{root}", "--out", str(out), "--embed"]) == 0
    return json.loads((out / "audit.json").read_text())["embedding"], out, planted


def test_planted_mask_corruptions_are_ranked_first(inspected):
    embedding, out, planted = inspected
    found = embedding["mask_issues"]
    assert embedding["label_issues"] is None  # no class label per image to rank
    top = [r["index"] for r in found["ranked"][:len(planted)]]
    assert sorted(top) == sorted(planted), [(r["index"], r["quality"], r["issue_share"]) for r in found["ranked"][:8]]
    assert found["agreement"] > 0.85  # the probe itself segments the clean images well
    flagged = {r["index"] for r in found["ranked"] if r["flagged"]}
    assert {3, 13} <= flagged and found["flagged"] == len(flagged)  # the two largest corruptions at least
    excluded = (out / "exclude.txt").read_text()
    assert all(f"train/image/{i:02d}.png" in excluded for i in flagged)


def test_the_page_shows_image_given_and_predicted_masks(inspected, tmp_path):
    embedding, out, planted = inspected
    info = view_page(out / "report.html", tmp_path / "page.png")
    assert "Likely mask errors" in info["headings"]
    shown = [i for i in info["images"] if i["alt"] == "mask error candidate"]
    assert len(shown) == min(E.SHOWN_MASKS, COUNT) and all(i["width"] > 0 and i["shown"] > 0 for i in shown)
    html = (out / "report.html").read_text()
    section = html[html.index("Likely mask errors"):]
    first = [section.index(r["id"]) for r in embedding["mask_issues"]["ranked"][:3]]
    assert first == sorted(first)  # shown in rank order
