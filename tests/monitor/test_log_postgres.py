"""Two servers share one prediction log in a real PostgreSQL (started by the test on 127.0.0.1):
each logs what it answers, and feedback sent to one server labels a prediction the other made;
the inputs both captured are exported from the database as a folder: dataset."""
import httpx
import pytest

from cvrecipe.cli import main
from cvrecipe.monitor import MonitorSettings

from monitor_helpers import served  # noqa: F401 (session fixture)
from postgres_helpers import postgres_cluster
from serve_helpers import one_torch_thread, running_server  # noqa: F401 (fixture)
from test_monitor_server import predict

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: end to end


def test_two_servers_share_a_postgres_log(served, tmp_path, capsys):
    import psycopg

    export_dir, files = served
    with postgres_cluster() as url:
        settings = MonitorSettings(log_db=url, interval_s=0.2, capture_percent=100)
        with running_server(export_dir, monitor=settings) as (a, _), \
                running_server(export_dir, monitor=MonitorSettings(log_db=url, interval_s=0.2, capture_percent=100)) \
                as (b, _), \
                httpx.Client(timeout=30) as client:
            answers = [(label, predict(client, a if i % 2 else b, data)) for i, (label, data) in enumerate(files[:30])]
            from_b = [(label, ans) for i, (label, ans) in enumerate(answers) if i % 2 == 0]
            for label, ans in from_b:  # server a has these only through the shared log
                r = client.post(a + "/v1/feedback", json={"request_id": ans["request_id"], "label": label})
                assert r.status_code == 200 and r.json()["stored"] == "log", r.text
            assert client.get(a + "/v1/monitor", params={"fresh": True}).json()["accuracy"]["labelled"] == 15
        with psycopg.connect(url) as con:
            rows = dict(con.execute("SELECT request_id, label FROM predictions").fetchall())
        # the captured inputs of both servers, from the database: the labelled ones in their label's folder
        out = tmp_path / "relabel"
        assert main(["monitor", "export", url, str(out), "--where", "label != ''"]) == 0
        assert "15 captured inputs of 15 matching predictions" in capsys.readouterr().out
    assert set(rows) == {ans["request_id"] for _, ans in answers}
    assert all(rows[ans["request_id"]] == label for label, ans in from_b)
    sent = {ans["request_id"]: data for (_, ans), (_, data) in zip(answers, files[:30])}
    exported = sorted(out.glob("train/*/*"))
    assert len(exported) == 15
    for path in exported:
        request_id = path.name.split("-")[0]
        assert rows[request_id] == path.parent.name and path.read_bytes() == sent[request_id]
