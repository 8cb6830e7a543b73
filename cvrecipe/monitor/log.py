"""The prediction log: one SQLite row per classified image, written off the request path.

Group commit: requests hand their rows to one writer thread and await its commit; the thread
takes everything queued since its last commit and writes it in one transaction. The event loop
never touches the database, a busy server commits many rows per transaction, and a response is
sent only once its rows are committed, so a server killed with SIGKILL loses no row of a response
it sent (WAL mode with synchronous=NORMAL: a commit survives the process dying; only a power cut
may lose the last transactions). Feedback labels go through the same thread and are acknowledged
after their commit too. Retention (max rows, max age) runs on the writer thread between commits.

The log is an SQLite file, or a PostgreSQL database (`postgresql://USER@HOST:PORT/DB`, through
psycopg) that several servers, on one machine or several, write to together.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("cvrecipe.monitor")

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    item INTEGER NOT NULL,          -- the file's position in its request (0 for /v1/predict)
    time REAL NOT NULL,             -- unix seconds
    model_version TEXT,
    file TEXT,
    predicted TEXT,
    confidence REAL,
    top_k TEXT,                     -- JSON [{class, probability}, ...]
    latency_ms REAL,                -- the request's, up to the answer
    input_hash TEXT,                -- sha256 of the file's bytes
    width INTEGER, height INTEGER,  -- as the file's header declares
    stats TEXT,                     -- JSON: the input statistics drift is computed from
    state TEXT,                     -- the overall drift state when it was served: ok | warn | alert | waiting
    label TEXT,                     -- the true class, from POST /v1/feedback
    label_time REAL,
    capture TEXT                    -- the saved input file, relative to the capture folder
);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id, item);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
"""
COLUMNS = ("request_id", "item", "time", "model_version", "file", "predicted", "confidence", "top_k", "latency_ms",
           "input_hash", "width", "height", "stats", "state", "capture")
RETENTION_EVERY_S = 2.0
MAX_ROWS_PER_COMMIT = 2000


PG_SCHEMA = SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY").replace(" REAL", " DOUBLE PRECISION")


def is_url(target) -> bool:
    return str(target).startswith(("postgresql://", "postgres://", "postgresql+psycopg://"))


def connect(target, readonly: bool = False):
    """(connection, parameter placeholder) for an SQLite file or a PostgreSQL URL; in autocommit
    mode (transactions are explicit BEGIN / COMMIT), the table created when writing."""
    if is_url(target):
        try:
            import psycopg
        except ImportError as err:
            raise RuntimeError("a PostgreSQL prediction log needs psycopg: pip install 'cvrecipe[postgres]'") from err
        db = psycopg.connect(str(target).replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        if not readonly:
            for statement in PG_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        return db, "%s"
    if readonly:
        if not Path(target).is_file():
            raise FileNotFoundError(f"no prediction log at {target}")
        return sqlite3.connect(f"file:{target}?mode=ro", uri=True), "?"
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db, "?"


class PredictionLog:
    def __init__(self, target, capture_dir: Path | None = None, max_rows: int | None = None,
                 max_age_s: float | None = None):
        self.path = target if is_url(target) else Path(target)
        self.capture_dir = capture_dir
        self.max_rows, self.max_age_s = max_rows, max_age_s
        if not is_url(target):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if capture_dir is not None:
            capture_dir.mkdir(parents=True, exist_ok=True)
        self._db, p = connect(self.path)  # opened here so a bad path or URL fails at start, with its name
        self._insert = (f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join([p] * len(COLUMNS))})")
        self._label = f"UPDATE predictions SET label={p}, label_time={p} WHERE request_id={p} AND item={p}"
        self._param = p
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cvrecipe-log", daemon=True)
        self.rows_written = 0
        self.commits = 0
        self._last_retention = 0.0

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    async def write(self, rows: list[dict], captures: dict[str, bytes] | None = None) -> None:
        """Queue rows (dicts with COLUMNS) and the capture files {name: bytes}; returns once committed."""
        await self._submit(("rows", rows, captures or {}))

    async def feedback(self, request_id: str, item: int, label: str) -> int:
        """Set the label of a logged prediction; returns the rows updated (0: no such prediction)."""
        return await self._submit(("label", (label, time.time(), request_id, item), None))

    def lookup(self, request_id: str, item: int) -> tuple[str, float] | None:
        """(predicted, confidence) of a logged prediction, from a short-lived read connection."""
        db, p = connect(self.path, readonly=True)
        try:
            row = db.execute(f"SELECT predicted, confidence FROM predictions WHERE request_id={p} AND item={p} "
                             "ORDER BY id DESC LIMIT 1", (request_id, item)).fetchone()
        finally:
            db.close()
        return row

    async def _submit(self, op: tuple):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((op, loop, future))
        return await future

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < MAX_ROWS_PER_COMMIT:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            batch = [b for b in batch if b is not None]
            if batch:
                self._commit(batch)
            if time.monotonic() - self._last_retention > RETENTION_EVERY_S:
                self._retain()
        self._db.close()

    def _commit(self, batch: list) -> None:
        results, error = [], None
        try:
            for (kind, payload, captures), _, _ in batch:
                if kind == "rows":
                    for name, data in captures.items():  # before the row that names it is committed
                        (self.capture_dir / name).write_bytes(data)
            self._db.execute("BEGIN")
            for (kind, payload, _), _, _ in batch:
                if kind == "rows":
                    self._db.cursor().executemany(self._insert, [tuple(row.get(c) for c in COLUMNS) for row in payload])
                    results.append(len(payload))
                else:
                    cur = self._db.execute(self._label, payload)
                    results.append(cur.rowcount)
            self._db.execute("COMMIT")
            self.rows_written += sum(len(p) for (k, p, _), _, _ in batch if k == "rows")
            self.commits += 1
        except Exception as err:  # noqa: BLE001 - every waiting request gets the error
            log.exception("prediction log write failed")
            error = err
            try:
                self._db.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - no transaction was open
                pass
        for i, (_, loop, future) in enumerate(batch):
            outcome = error or results[i]
            loop.call_soon_threadsafe(_resolve, future, outcome)

    def _retain(self) -> None:
        self._last_retention = time.monotonic()
        if self.max_rows is None and self.max_age_s is None:
            return
        conditions, args, p = [], [], self._param
        if self.max_age_s is not None:
            conditions.append(f"time < {p}")
            args.append(time.time() - self.max_age_s)
        if self.max_rows is not None:
            conditions.append(f"id <= (SELECT MAX(id) FROM predictions) - {p}")
            args.append(self.max_rows)
        where = " OR ".join(conditions)
        try:
            captured = [r[0] for r in self._db.execute(f"SELECT capture FROM predictions WHERE ({where}) "
                                                        f"AND capture IS NOT NULL", args)]
            self._db.execute(f"DELETE FROM predictions WHERE {where}", args)
        except Exception:  # noqa: BLE001 - sqlite3 or psycopg errors; retried next time
            log.exception("prediction log retention failed")
            return
        for name in captured:
            (self.capture_dir / name).unlink(missing_ok=True)


def _resolve(future: asyncio.Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def row_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))
