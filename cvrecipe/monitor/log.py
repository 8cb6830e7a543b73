"""The prediction log: one row per classified image, written off the request path.

SQLite (one server per file): a response's rows are appended to a journal file beside the
database (`NAME.pending`, one JSON line per row with a sequence number) before the response is
sent: one write() call, which the kernel keeps if the process is then killed, so a server killed
with SIGKILL loses no row of a response it sent, and the request never waits for the database.
A writer thread moves queued rows into the database in batches (WAL mode, synchronous=NORMAL),
recording the last sequence number it committed in the same transaction; when a log is opened,
journal lines past that number are committed first (the rows of a killed server). The journal
is emptied once everything in it is committed and it has grown past JOURNAL_MAX_BYTES.

PostgreSQL (`postgresql://USER@HOST:PORT/DB`, through psycopg), for several servers on one
machine or several writing one log: group commit, each request awaiting the commit of the
transaction that carries its rows (the writer takes everything queued since its last commit).

Feedback labels go through the writer thread in both cases and are acknowledged after their
commit. Retention (max rows, max age) runs on the writer thread between commits.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
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
CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY CHECK (id = 0), committed_seq INTEGER NOT NULL);
INSERT OR IGNORE INTO journal VALUES (0, 0);
"""
COLUMNS = ("request_id", "item", "time", "model_version", "file", "predicted", "confidence", "top_k", "latency_ms",
           "input_hash", "width", "height", "stats", "state", "capture")
RETENTION_EVERY_S = 2.0
MAX_ROWS_PER_COMMIT = 2000
COMMIT_EVERY_S = 0.05  # SQLite with its journal: at most one commit per interval
JOURNAL_MAX_BYTES = 8 << 20  # the journal is emptied, once committed, past this size


# PostgreSQL keeps captured files in the database: the servers sharing it may run on other machines
PG_SCHEMA = SCHEMA[:SCHEMA.index("CREATE TABLE IF NOT EXISTS journal")].replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY").replace(" REAL", " DOUBLE PRECISION") \
    + "CREATE TABLE IF NOT EXISTS captures (name TEXT PRIMARY KEY, data BYTEA NOT NULL);\n"


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
        self._insert = insert_sql(p)
        self._label = f"UPDATE predictions SET label={p}, label_time={p} WHERE request_id={p} AND item={p}"
        self._param = p
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cvrecipe-log", daemon=True)
        self.rows_written = 0
        self.commits = 0
        self._last_retention = 0.0
        self._journal = None if is_url(target) else Journal(journal_path(self.path), self._db, self._insert)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    async def write(self, rows: list[dict], captures: dict[str, bytes] | None = None) -> None:
        """Log rows (dicts with COLUMNS) and the capture files {name: bytes}; returns once they would
        survive the process being killed: journalled (SQLite) or committed (PostgreSQL)."""
        values = [tuple(row.get(c) for c in COLUMNS) for row in rows]
        if self._journal is not None:
            for name, data in (captures or {}).items():  # before the row that names it
                (self.capture_dir / name).write_bytes(data)
            self._queue.put((("rows", values, self._journal.append(values)), None, None))
        else:  # PostgreSQL: the files in the rows' transaction
            await self._submit(("rows", values, list((captures or {}).items())))

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
        stop, last_commit = False, 0.0
        while not stop:
            batch = self._take()
            if self._journal is not None and None not in batch:
                # nobody waits for a journalled row's commit: gather COMMIT_EVERY_S of rows per
                # transaction, since a commit's fixed cost (~0.1 ms) dwarfs a row's (~5 µs)
                time.sleep(max(0.0, last_commit + COMMIT_EVERY_S - time.monotonic()))
                batch += self._take(block=False)
            last_commit = time.monotonic()
            stop = None in batch
            batch = [b for b in batch if b is not None]
            if batch:
                self._commit(batch)
            if self._journal is not None and self._journal.full():
                with self._journal.lock:  # appends wait for one commit, then the journal starts empty
                    rest = self._take(block=False)
                    stop = stop or None in rest
                    self._commit([b for b in rest if b is not None])
                    self._journal.empty_if_committed()
            if time.monotonic() - self._last_retention > RETENTION_EVERY_S:
                self._retain()
        if self._journal is not None:
            self._journal.close()
        self._db.close()

    def _take(self, block: bool = True) -> list:
        batch = [self._queue.get()] if block else []
        while len(batch) < MAX_ROWS_PER_COMMIT:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list) -> None:
        if not batch:
            return
        results, error, seq = [], None, None
        try:
            self._db.execute("BEGIN")
            for (kind, payload, extra), _, _ in batch:  # extra: the journal's last seq, or PostgreSQL's captures
                if kind == "rows":
                    self._db.cursor().executemany(self._insert, payload)
                    results.append(len(payload))
                    if self._journal is not None:
                        seq = extra
                    elif extra:
                        self._db.cursor().executemany("INSERT INTO captures (name, data) VALUES (%s, %s)", extra)
                else:
                    cur = self._db.execute(self._label, payload)
                    results.append(cur.rowcount)
            if seq is not None:
                self._db.execute("UPDATE journal SET committed_seq=? WHERE id=0", (seq,))
            self._db.execute("COMMIT")
            if seq is not None:
                self._journal.committed(seq)
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
            if future is not None:
                loop.call_soon_threadsafe(_resolve, future, error or results[i])

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
            self._db.execute("BEGIN")
            if self._journal is None:  # PostgreSQL: the captured files are rows too
                self._db.execute(f"DELETE FROM captures WHERE name IN (SELECT capture FROM predictions "
                                 f"WHERE ({where}) AND capture IS NOT NULL)", args)
            self._db.execute(f"DELETE FROM predictions WHERE {where}", args)
            self._db.execute("COMMIT")
        except Exception:  # noqa: BLE001 - sqlite3 or psycopg errors; retried next time
            log.exception("prediction log retention failed")
            try:
                self._db.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - no transaction was open
                pass
            return
        if self._journal is not None:
            for name in captured:
                (self.capture_dir / name).unlink(missing_ok=True)


def insert_sql(param: str) -> str:
    return f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join([param] * len(COLUMNS))})"


def recover(db_path: Path) -> None:
    """Commit the rows a killed server left in an SQLite log's journal (as its next start would);
    nothing to do when the journal is empty or a running server holds it (its writer commits them)."""
    path = journal_path(Path(db_path))
    if not path.is_file() or path.stat().st_size == 0:
        return
    db, p = connect(db_path)
    try:
        Journal(path, db, insert_sql(p)).close()
    except RuntimeError:
        pass
    finally:
        db.close()


def journal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".pending")


class Journal:
    """The rows of an SQLite log not yet committed, one JSON line each: [seq, *COLUMNS values].

    Held with an exclusive lock (flock) while its server runs: a second server on the same SQLite
    file is refused (several servers share a log through PostgreSQL). Opening it commits the lines
    a killed server left past the database's committed_seq."""

    def __init__(self, path: Path, db, insert: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RuntimeError(f"prediction log {path.with_suffix('')} is in use by another server process "
                               f"(its journal {path.name} is locked); several servers share one log through "
                               "PostgreSQL: --log-db postgresql://USER@HOST:PORT/DB") from None
        self.lock = threading.Lock()  # appends (event loop) against emptying (writer thread)
        self.seq = self.committed_seq = replay(path, db, insert)
        os.ftruncate(self.fd, 0)
        self.size = 0

    def append(self, values: list[tuple]) -> int:
        """Write the rows' lines in one write() call; returns the last row's sequence number."""
        with self.lock:
            lines = []
            for row in values:
                self.seq += 1
                lines.append(json.dumps([self.seq, *row], separators=(",", ":")))
            data = ("\n".join(lines) + "\n").encode()
            os.write(self.fd, data)
            self.size += len(data)
            return self.seq

    def committed(self, seq: int) -> None:
        self.committed_seq = seq

    def full(self) -> bool:
        return self.size > JOURNAL_MAX_BYTES

    def empty_if_committed(self) -> None:
        """With self.lock held by the caller."""
        if self.committed_seq == self.seq:
            os.ftruncate(self.fd, 0)
            self.size = 0

    def close(self) -> None:
        with self.lock:
            if self.committed_seq == self.seq:
                self.path.unlink(missing_ok=True)
        os.close(self.fd)


def replay(path: Path, db, insert: str) -> int:
    """Commit the journal's rows past the database's committed_seq; returns the new committed_seq.
    A torn last line (the process killed inside write()) belongs to no answered request: skipped."""
    committed = db.execute("SELECT committed_seq FROM journal WHERE id=0").fetchone()[0]
    rows, seq = [], committed
    with open(path, "rb") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s: skipped a torn line", path)
                continue
            if entry[0] > seq:
                rows.append(tuple(entry[1:]))
                seq = entry[0]
    if rows:
        db.execute("BEGIN")
        db.cursor().executemany(insert, rows)
        db.execute("UPDATE journal SET committed_seq=? WHERE id=0", (seq,))
        db.execute("COMMIT")
        log.warning("prediction log %s: committed %d row(s) a stopped server had journalled", path, len(rows))
    return seq


def _resolve(future: asyncio.Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def row_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))
