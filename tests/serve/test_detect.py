"""POST /v1/detect on a server of another task's model: 409 naming both tasks, as every task's route
answers, never a 5xx (detection models themselves are not served yet: the route then answers 501)."""
from __future__ import annotations

import httpx

from serve_helpers import running_server, train_stripes_run


def test_detect_on_a_classifier_is_a_409_naming_the_served_task(tmp_path):
    run_dir, images = train_stripes_run(tmp_path)
    data = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
    with running_server(run_dir, backend="torch") as (url, _):
        r = httpx.post(url + "/v1/detect", content=data, headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 409, r.text
    assert "detection" in r.text and "classification" in r.text
