"""The dashboard in headless Chromium against a real server: it renders, updates by itself as
traffic arrives, and loads nothing from elsewhere; the terminal view and the profile command.

With CVRECIPE_UPDATE_DOCS=1 the screenshot also refreshes docs/images/monitor-dashboard.png."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from cvrecipe.cli import main
from cvrecipe.monitor import MonitorSettings
from cvrecipe.monitor.profile import read_profile

from monitor_helpers import served  # noqa: F401 (session fixture)
from serve_helpers import one_torch_thread, running_server  # noqa: F401 (fixture)
from test_monitor_server import predict, shifted

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: end to end


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install chromium; `make test` installs it as root)")
def test_dashboard_renders_and_updates_in_chromium(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    export_dir, files = served
    settings = MonitorSettings(window=100, min_samples=50, interval_s=0.3)
    with running_server(export_dir, monitor=settings) as (url, _), sync_api.sync_playwright() as p, \
            httpx.Client(timeout=30) as client:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url + "/dashboard")
            page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=15_000)
            assert page.locator("#state").inner_text() == "waiting"
            answers = [(label, predict(client, url, data)) for label, data in files[:80]]
            for label, answer in answers[:40]:
                client.post(url + "/v1/feedback", json={"request_id": answer["request_id"], "label": label})
            page.wait_for_function("Number(document.body.dataset.served) >= 80", timeout=15_000)
            sync_api.expect(page.locator("#state")).to_have_text("ok", timeout=15_000)
            sync_api.expect(page.locator("[data-card=labelled]")).to_have_text("40", timeout=15_000)
            assert page.locator("#classmix rect.bar").count() == 3
            assert page.locator("#drift tbody tr").count() >= 8
            for _, data in files[80:180]:
                predict(client, url, shifted(data, "dark"))
            sync_api.expect(page.locator("#state")).to_have_text("alert", timeout=15_000)
            page.wait_for_function("document.querySelectorAll('#throughput polyline.series').length == 1 && "
                                   "document.querySelector('#throughput polyline').getAttribute('points').length > 0")
            assert page.locator("#error").inner_text() == ""
            shot = tmp_path / "monitor-dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert all(u.startswith(url) for u in requested), [u for u in requested if not u.startswith(url)]
    assert shot.stat().st_size > 0
    if os.environ.get("CVRECIPE_UPDATE_DOCS") == "1":
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "images" / "monitor-dashboard.png")


def test_terminal_view_once(served, capsys):
    export_dir, files = served
    with running_server(export_dir, monitor=MonitorSettings(interval_s=0.2)) as (url, _), httpx.Client() as client:
        for _, data in files[:10]:
            predict(client, url, data)
        assert main(["monitor", url, "--once"]) == 0
    out = capsys.readouterr().out
    assert "window 10/500" in out and "drift against the reference" in out and "brightness" in out
    assert main(["monitor", "http://127.0.0.1:9/", "--once"]) != 0  # nothing listens: one error line
    assert "error:" in capsys.readouterr().err


def test_profile_command_writes_a_profile(served, tmp_path):
    export_dir, _ = served
    run_dir = export_dir.parent
    assert main(["monitor", "profile", str(run_dir), "--out", str(tmp_path), "--max-images", "120"]) == 0
    profile = read_profile(tmp_path / "profile.json")
    assert profile["images"] == 60 and profile["source"]["run"] == str(run_dir)
    assert main(["monitor", "profile", str(tmp_path)]) == 2  # not a run folder: a bad-input error


def test_grafana_dashboard_queries_metrics_the_server_exposes(served):
    import json
    import re

    dashboard = json.loads((ROOT / "docs" / "grafana-cvrecipe.json").read_text())
    queried = {re.sub(r"_(bucket|sum|count)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"cvrecipe_\w+", target["expr"])}
    export_dir, files = served
    with running_server(export_dir, monitor=MonitorSettings(interval_s=0.2)) as (url, _), httpx.Client() as client:
        predict(client, url, files[0][1])
        text = client.get(url + "/metrics").text
    exposed = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in re.findall(r"cvrecipe_\w+", text)}
    assert len(queried) >= 15 and queried <= exposed, sorted(queried - exposed)
