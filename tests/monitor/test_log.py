"""The prediction log: retention, and no row lost when the server is killed with SIGKILL under load;
the export of captured inputs, and that what it writes trains."""
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from cvrecipe.monitor.export import export_captures, parse_where
from cvrecipe.monitor.log import PredictionLog, journal_path, recover

from serve_helpers import loopback_socket, wait_until
from monitor_helpers import served  # noqa: F401 (session fixture: an exported model with its profile)

ROOT = Path(__file__).resolve().parents[2]


def rows(n, start_time, prefix="r"):
    return [{"request_id": f"{prefix}{i}", "item": 0, "time": start_time + i, "predicted": "cat", "confidence": 0.9}
            for i in range(n)]


def test_retention_by_rows_and_by_age(tmp_path):
    async def scenario(log, batches):
        log.start()
        for batch in batches:
            await log.write(batch)
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        log._last_retention = 0  # run retention after the next commit instead of in 2 s
        await log.write(rows(1, time.time(), "last"))
        await log.close()

    by_rows = PredictionLog(tmp_path / "rows.sqlite", max_rows=25)
    asyncio.run(scenario(by_rows, [rows(20, time.time(), f"b{k}-") for k in range(3)]))
    with sqlite3.connect(tmp_path / "rows.sqlite") as con:
        ids = [r[0] for r in con.execute("SELECT request_id FROM predictions ORDER BY id")]
    assert len(ids) == 25 and ids[-1] == "last0" and ids[0] == "b1-16"  # the newest 25 of 61

    by_age = PredictionLog(tmp_path / "age.sqlite", max_age_s=3600)
    asyncio.run(scenario(by_age, [rows(10, time.time() - 7200, "old"), rows(10, time.time() - 60, "new")]))
    with sqlite3.connect(tmp_path / "age.sqlite") as con:
        kept = {r[0][:3] for r in con.execute("SELECT request_id FROM predictions")}
    assert kept == {"new", "las"}


def test_journalled_rows_of_a_killed_writer_are_committed_when_the_log_opens_again(tmp_path):
    """A response's rows are in the journal when write() returns; a process killed before its
    writer committed them leaves them there, and the next opening commits them, once."""
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(ROOT)!r})
from cvrecipe.monitor.log import PredictionLog
async def main():
    log = PredictionLog({str(tmp_path / 'log.sqlite')!r})  # writer thread never started: nothing committed
    for k in range(5):
        await log.write([{{"request_id": f"r{{k}}-{{i}}", "item": 0, "time": 1.0 + i}} for i in range(3)])
    os.kill(os.getpid(), 9)
asyncio.run(main())
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    db = tmp_path / "log.sqlite"
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0
    assert len(journal_path(db).read_text().splitlines()) == 15
    with open(journal_path(db), "a") as f:
        f.write('[16,"torn')  # a write() cut short: no answered request owns it
    log = PredictionLog(db)
    log.start()
    asyncio.run(log.close())
    recover(db)  # nothing left: a second opening adds no duplicate
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute("SELECT request_id FROM predictions ORDER BY id")]
    assert ids == [f"r{k}-{i}" for k in range(5) for i in range(3)]
    assert not journal_path(db).exists()


def test_the_journal_is_emptied_once_committed_past_its_limit(tmp_path, monkeypatch):
    import cvrecipe.monitor.log as log_module

    monkeypatch.setattr(log_module, "JOURNAL_MAX_BYTES", 4000)
    sizes = []

    async def scenario(log):
        log.start()
        for k in range(200):
            await log.write(rows(3, time.time(), f"b{k}-"))
            sizes.append(journal_path(log.path).stat().st_size)
            await asyncio.sleep(0.001 if k % 10 else 0.02)
        await log.close()

    asyncio.run(scenario(PredictionLog(tmp_path / "log.sqlite")))
    with sqlite3.connect(tmp_path / "log.sqlite") as con:
        assert con.execute("SELECT COUNT(DISTINCT request_id) FROM predictions").fetchone()[0] == 600
    assert sum(a > b for a, b in zip(sizes, sizes[1:])) >= 3  # emptied again and again
    assert max(sizes) < 4000 * 4


def test_a_second_server_on_one_sqlite_log_is_refused_with_the_way_to_share(tmp_path):
    first = PredictionLog(tmp_path / "log.sqlite")
    with pytest.raises(RuntimeError, match=r"in use by another server process.*postgresql://"):
        PredictionLog(tmp_path / "log.sqlite")
    first.start()
    asyncio.run(first.close())
    second = PredictionLog(tmp_path / "log.sqlite")  # free once the first closed
    second.start()
    asyncio.run(second.close())


def test_where_filters_as_sqlite_evaluates_them(tmp_path):
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE p (state TEXT, confidence REAL, label TEXT, predicted TEXT)")
    data = [("ok", 0.9, "cat", "cat"), ("alert", 0.95, None, "dog"), ("ok", 0.3, "dog", "cat"), ("warn", 0.6, None, "1")]
    con.executemany("INSERT INTO p VALUES (?, ?, ?, ?)", data)
    cases = {"state=alert or confidence<0.5": [1, 2], "predicted=cat and label!=cat": [2],
             "not (state=ok) and confidence >= 0.6": [1, 3], "predicted='1'": [3], "predicted=1": [3]}
    for text, expected in cases.items():
        sql, params = parse_where(text)
        got = [r[0] - 1 for r in con.execute(f"SELECT rowid FROM p WHERE {sql} ORDER BY rowid", params)]
        assert got == expected, text
    for bad, words in {"color=red": "unknown field", "confidence<high": "takes a number", "(state=ok": "not closed",
                       "state=": "FIELD OP VALUE", "state=ok; DROP TABLE p": "unexpected", "state=ok && x": "unexpected", "state='ok": "cannot read"}.items():
        with pytest.raises(ValueError, match=words):
            parse_where(bad)


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_row_or_acknowledged_feedback(served, tmp_path):
    export_dir, files = served
    db = tmp_path / "log.sqlite"
    sock = loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cvrecipe", "serve", str(export_dir), "--port", str(port),
                             "--log-db", str(db)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    answered, acknowledged, lock, stop = [], [], threading.Lock(), threading.Event()

    def client(k):  # predicts, and sends feedback for every other answer, until the server dies
        with httpx.Client(timeout=10) as c:
            for n in range(2000):
                if stop.is_set():
                    return
                label, data = files[(k * 37 + n) % len(files)]
                try:
                    r = c.post(url + "/v1/predict", content=data, headers={"content-type": "image/jpeg"})
                    if r.status_code == 200:
                        with lock:
                            answered.append(r.json()["request_id"])
                        if n % 2:
                            f = c.post(url + "/v1/feedback", json={"request_id": r.json()["request_id"], "label": label})
                            if f.status_code == 200:
                                with lock:
                                    acknowledged.append((r.json()["request_id"], label))
                except httpx.HTTPError:
                    return  # the server is gone

    try:
        wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 90, "the server process")
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acknowledged) >= 60, 60, "load with feedback")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    recover(db)  # as the next start of the server, or `monitor export`, does
    assert not journal_path(db).exists()
    with sqlite3.connect(db) as con:
        logged = {r[0]: r[1] for r in con.execute("SELECT request_id, label FROM predictions")}
    assert len(answered) >= 60
    missing = [rid for rid in answered if rid not in logged]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no row"
    unlabelled = [(rid, label) for rid, label in acknowledged if logged.get(rid) != label]
    assert not unlabelled, f"{len(unlabelled)} of {len(acknowledged)} acknowledged labels are not stored"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*ignored 1 files outside split")
def test_exported_captures_form_a_dataset_that_trains(served, tmp_path):
    from cvrecipe.config import load_config
    from cvrecipe.monitor import MonitorSettings
    from cvrecipe.train.job import train

    from serve_helpers import running_server

    export_dir, files = served
    db = tmp_path / "log.sqlite"
    settings = MonitorSettings(log_db=db, capture_percent=100, interval_s=0.2)
    with running_server(export_dir, monitor=settings) as (url, _), httpx.Client(timeout=30) as c:
        for label, data in files[:90]:
            answer = c.post(url + "/v1/predict", content=data, headers={"content-type": "image/jpeg"}).json()
            if answer["top"][0]["probability"] < 0.999:  # relabel what the model was unsure of
                assert c.post(url + "/v1/feedback", json={"request_id": answer["request_id"], "label": label}).is_success
    out = tmp_path / "relabel"
    counts = export_captures(db, out, where="confidence < 2")
    assert counts["written"] == counts["matched"] == 90 and counts["classes"] == 3
    lines = (out / "predictions.csv").read_text().splitlines()
    assert len(lines) == 91 and lines[0].startswith("file,predicted,label")
    assert export_captures(db, tmp_path / "none", where="confidence > 2")["written"] == 0
    cfg = load_config("digits-quick", [f"data.name=folder:{out}", f"runs_dir={tmp_path / 'runs'}", "name=again",
                                       "train.epochs=2", "train.sanity=false", "model.kwargs={width: 8}",
                                       f"data.cache_dir={tmp_path / 'cache'}"])
    run_dir = train(cfg, console=Console(quiet=True))
    assert (run_dir / "best.safetensors").is_file()
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
