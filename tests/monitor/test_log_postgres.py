"""Two servers share one prediction log in a real PostgreSQL (started by the test on 127.0.0.1):
each logs what it answers, and feedback sent to one server labels a prediction the other made."""
import httpx
import pytest

from cvrecipe.monitor import MonitorSettings

from monitor_helpers import served  # noqa: F401 (session fixture)
from postgres_helpers import postgres_cluster
from serve_helpers import one_torch_thread, running_server  # noqa: F401 (fixture)
from test_monitor_server import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_servers_share_a_postgres_log(served):
    import psycopg

    export_dir, files = served
    with postgres_cluster() as url:
        settings = MonitorSettings(log_db=url, interval_s=0.2)
        with running_server(export_dir, monitor=settings) as (a, _), \
                running_server(export_dir, monitor=MonitorSettings(log_db=url, interval_s=0.2)) as (b, _), \
                httpx.Client(timeout=30) as client:
            answers = [(label, predict(client, a if i % 2 else b, data)) for i, (label, data) in enumerate(files[:30])]
            from_b = [(label, ans) for i, (label, ans) in enumerate(answers) if i % 2 == 0]
            for label, ans in from_b:  # server a has these only through the shared log
                r = client.post(a + "/v1/feedback", json={"request_id": ans["request_id"], "label": label})
                assert r.status_code == 200 and r.json()["stored"] == "log", r.text
            assert client.get(a + "/v1/monitor", params={"fresh": True}).json()["accuracy"]["labelled"] == 15
        with psycopg.connect(url) as con:
            rows = dict(con.execute("SELECT request_id, label FROM predictions").fetchall())
    assert set(rows) == {ans["request_id"] for _, ans in answers}
    assert all(rows[ans["request_id"]] == label for label, ans in from_b)
