"""With a token, callers without it read no filesystem path, host or user name anywhere: every
route in the real server's route table (plus an unknown route and a wrong method) is called
without the token, after traffic from the token holder, with the prediction log and reference
profile in use, and on a server whose model failed to load. The pages are the package's static
files, byte for byte; every other body is searched for the run folder, the log, temp and home
folders, any path that exists on this machine, the host name and the user name."""
import getpass
import os
import re
import socket
import tempfile
from importlib import resources
from pathlib import Path

import httpx
import pytest

from cvrecipe.monitor import MonitorSettings

from monitor_helpers import served  # noqa: F401 (session fixture)
from serve_helpers import one_torch_thread, running_server, wait_until  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "s3cret"
STATIC = {"/": ("cvrecipe.serve", "static/index.html"), "/dashboard": ("cvrecipe.monitor", "static/dashboard.html")}
_ABSOLUTE = re.compile(r"(?<![\w.:/])/[^\s\"'<>()\\,;]+")


def _calls(app) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, from its own route table."""
    calls = [(method, route.path) for route in app.routes for method in sorted(getattr(route, "methods", None) or ())
             if method not in ("HEAD", "OPTIONS")]
    assert {"/v1/monitor", "/v1/model", "/readyz", "/metrics", "/openapi.json", "/dashboard"} <= {p for _, p in calls}
    return calls + [("GET", "/no/such/route"), ("DELETE", "/v1/model")]


def _private(body: str, secrets: list[str]) -> list[str]:
    """What in `body` is private: a given secret, a path that exists here, the host or user name as a word."""
    found = [s for s in secrets if s in body]
    found += [m for m in (m.rstrip(".") for m in _ABSOLUTE.findall(body)) if m != "/" and os.path.exists(m)]
    for word in (socket.gethostname(), getpass.getuser()):
        found += re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", body)
    return found


def _sweep(url: str, app, secrets: list[str]) -> dict[str, list[str]]:
    leaks = {}
    with httpx.Client(timeout=60) as client:
        for method, path in _calls(app):
            params = {"history": "true", "fresh": "true"} if path == "/v1/monitor" else None
            r = client.request(method, url + path, params=params, content=b"\xff\xd8 not an image",
                               headers={"content-type": "image/jpeg"})
            if path in STATIC and r.status_code == 200:
                package, name = STATIC[path]
                assert r.text == resources.files(package).joinpath(name).read_text(), path  # nothing of the server's
                continue
            text = r.text + " ".join(f"{k}: {v}" for k, v in r.headers.items())
            if _private(text, secrets):
                leaks[f"{method} {path} -> {r.status_code}"] = _private(text, secrets)
    return leaks


def test_callers_without_the_token_see_no_paths_hosts_or_user_names(served, tmp_path):
    export_dir, files = served
    log_db = tmp_path / "log.db"
    monitor = MonitorSettings(log_db=log_db, interval_s=0.2, min_samples=5)
    with running_server(export_dir, token=TOKEN, monitor=monitor) as (url, app):
        auth = {"authorization": f"Bearer {TOKEN}"}
        for _, data in files[:10]:
            r = httpx.post(url + "/v1/predict", content=data, headers={**auth, "content-type": "image/jpeg"}, timeout=30)
            assert r.status_code == 200, r.text
        # the token holder sees where the profile and the log live: there is something to hide
        mine = wait_until(lambda: (r := httpx.get(url + "/v1/monitor", params={"fresh": "true"}, headers=auth,
                                                  timeout=30).json())["log"] and r, 30, "the log in /v1/monitor")
        assert str(log_db) in str(mine) and str(export_dir) in str(mine)
        secrets = [str(export_dir), str(export_dir.parent), str(log_db), str(tmp_path), tempfile.gettempdir() + "/",
                   str(Path.home())]
        leaks = _sweep(url, app, secrets)
        public = httpx.get(url + "/v1/monitor").json()
    assert not leaks, leaks
    assert public["log"]["path"] == "log.db" and public["reference"]["path"] == "profile.json"


def test_a_model_that_failed_to_load_is_explained_without_its_path(served, tmp_path):
    broken = tmp_path / "broken-export"
    broken.mkdir()
    for f in served[0].iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"tampered")  # its sha256 no longer matches model.json
    with running_server(broken, wait_ready=False, token=TOKEN) as (url, app):
        body = wait_until(lambda: (r := httpx.get(url + "/readyz", timeout=5)).status_code == 503
                          and r.json().get("error") and r.json(), 30, "the load failure")
        mine = httpx.get(url + "/readyz", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5).json()
        leaks = _sweep(url, app, [str(broken), str(tmp_path), tempfile.gettempdir() + "/", str(Path.home())])
    assert str(broken) in mine["error"] and "model.onnx" in body["error"] and str(broken) not in body["error"]
    assert not leaks, leaks
