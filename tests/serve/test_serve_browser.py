"""The web page in a real browser: Debian's chromium driven by playwright against a real server.

Uploads a test image through the page's file picker and checks that the bars show the class the
eager model gives. Saves a screenshot in the test's tmp dir; with CVRECIPE_UPDATE_DOCS=1 it also
refreshes the README's docs/images/serve-page.png (never by default: a test run leaves the tree clean).
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

from cvrecipe.data.images import decode_images
from cvrecipe.export import export_run
from cvrecipe.artifact.checkpoint import load_model

from serve_helpers import CLASSES, one_torch_thread, running_server, train_stripes_run  # noqa: F401 (fixture)

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: end to end
ROOT = Path(__file__).resolve().parents[2]
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install chromium; `make test` installs it as root)")
def test_page_shows_the_top_classes_of_an_uploaded_image(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    run_dir, images = train_stripes_run(tmp_path)
    export_run(run_dir, "onnx", dynamic_batch=True)
    model = load_model(run_dir)
    image = expected = None
    for path in sorted((images / "test" / "fox").glob("*.jpg")):  # an image the model gets right
        x, _, _ = decode_images([(path.name, path.read_bytes())], 3, (16, 16))
        with torch.no_grad():
            if CLASSES[int(model(torch.from_numpy(x)).argmax())] == "fox":
                image, expected = path, "fox"
                break
    assert image is not None, "the trained model should classify at least one fox test image correctly"

    with running_server(run_dir) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("small-cnn", timeout=15_000)
            page.set_input_files("#file", str(image))
            labels = page.locator("#results .row .label")
            sync_api.expect(labels.first).to_have_text(expected, timeout=15_000)
            assert labels.count() == len(CLASSES)  # top-5 capped at the 3 classes there are
            sync_api.expect(page.locator("#latency")).to_contain_text("ms", timeout=5_000)
            width = page.locator("#results .row .fill").first.evaluate("e => parseFloat(e.style.width)")
            assert 100 / len(CLASSES) < width <= 100  # the winning bar is longer than a uniform guess
            assert page.locator("#error").inner_text() == ""
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 0
    if os.environ.get("CVRECIPE_UPDATE_DOCS") == "1":
        docs = ROOT / "docs" / "images"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs / "serve-page.png")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install chromium; `make test` installs it as root)")
def test_page_shows_the_mask_over_an_uploaded_image(tmp_path):
    """A segmentation model: the page asks /v1/segment, draws the mask over the image and shows each
    class's share of the pixels; the overlay the browser decodes is the eager model's mask."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cvrecipe.artifact.inference import predict_logits
    from serve_helpers import train_shapes_run

    run_dir, data = train_shapes_run(tmp_path)
    image = sorted((data / "image").glob("*.png"))[0]
    model = load_model(run_dir)
    expected = predict_logits(model, np.asarray(Image.open(image)).transpose(2, 0, 1)[None]).argmax(1)[0].numpy()
    with running_server(run_dir) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(url + "/")
            sync_api.expect(page.locator("#title")).to_have_text("Segment an image", timeout=15_000)
            page.set_input_files("#file", str(image))
            sync_api.expect(page.locator("#overlay")).to_be_visible(timeout=15_000)
            sync_api.expect(page.locator("#latency")).to_contain_text("ms", timeout=15_000)
            labels = page.locator("#results .row .label")
            assert labels.all_inner_texts() == model.meta["class_names"]
            src = page.locator("#overlay").get_attribute("src")
            natural = page.locator("#overlay").evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert natural == [48, 48]
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
            assert (mask == expected).mean() >= 0.999
            assert page.locator("#error").inner_text() == ""
            page.screenshot(path=str(tmp_path / "segment-page.png"), full_page=True)
        finally:
            browser.close()
