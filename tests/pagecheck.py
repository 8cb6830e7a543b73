"""Open a self-contained HTML page in headless Chromium (Debian's /usr/bin/chromium) and report
what a person would see: every image's decoded width and every table's row count."""
from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PROBE = """() => ({
  title: document.title,
  images: Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth,
                                                 shown: i.getBoundingClientRect().width})),
  tables: Array.from(document.querySelectorAll('table')).map(t => t.querySelectorAll('tbody tr').length),
  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
})"""


def view_page(html: Path, screenshot: Path) -> dict:
    """Load `html` from a file:// URL (offline), screenshot the whole page, return the probe above."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium; `make setup-test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            info = page.evaluate(PROBE)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return info
