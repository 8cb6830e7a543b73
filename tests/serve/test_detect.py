"""POST /v1/detect: not served yet, and it says so (501 with one line) rather than failing silently."""
from __future__ import annotations

import httpx

from serve_helpers import running_server, train_stripes_run


def test_detect_answers_501_naming_what_is_missing(tmp_path):
    run_dir, images = train_stripes_run(tmp_path)
    data = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
    with running_server(run_dir, backend="torch") as (url, _):
        r = httpx.post(url + "/v1/detect", content=data, headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 501 and "not served yet" in r.json()["detail"]
