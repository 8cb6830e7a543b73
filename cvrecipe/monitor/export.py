"""Close the loop: the captured inputs of selected predictions, written as a `folder:` dataset.

`--where` takes a small filter language over the prediction log's columns, translated to SQL with
bound parameters (never pasted into the query): comparisons `FIELD OP VALUE` with OP one of
= != < <= > >=, joined by `and` / `or`, negated by `not`, grouped by parentheses, e.g.
`state=alert or confidence<0.5`, `predicted=cat and label!=cat`.
"""
from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

from cvrecipe.monitor.log import connect, is_url, recover

NUMBERS = {"confidence", "latency_ms", "time", "width", "height"}
FIELDS = NUMBERS | {"predicted", "label", "state", "model_version", "file", "request_id"}
TOKEN = re.compile(r"\s*(?:(?P<op><=|>=|!=|=|<|>)|(?P<paren>[()])|'(?P<quoted>[^']*)'|\"(?P<dquoted>[^\"]*)\""
                   r"|(?P<word>[^\s()<>=!'\"]+))")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PLACEHOLDER = "\x00"  # where a bound parameter goes; no token can contain it


def parse_where(text: str, param: str = "?") -> tuple[str, list]:
    """(SQL condition, parameters) of a --where expression, with `param` as the placeholder
    (SQLite's ?, psycopg's %s); ValueError naming what is wrong."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f"--where: cannot read '{text[pos:]}'")
        kind = match.lastgroup
        value = match.group(kind)
        tokens.append(("value" if kind in ("quoted", "dquoted") else kind, value))
        pos = match.end()
    params: list = []
    sql, rest = _expr(tokens, params)
    if rest:
        raise ValueError(f"--where: unexpected '{rest[0][1]}'")
    return sql.replace(PLACEHOLDER, param), params


def _expr(tokens, params, joiner="or"):
    """`or` of `and`s of terms: `and` binds tighter, as in SQL."""
    part = _term if joiner == "and" else (lambda t, p: _expr(t, p, "and"))
    left, tokens = part(tokens, params)
    while tokens and tokens[0] == ("word", tokens[0][1]) and tokens[0][1].lower() == joiner:
        right, tokens = part(tokens[1:], params)
        left = f"({left} {joiner.upper()} {right})"
    return left, tokens


def _term(tokens, params):
    if not tokens:
        raise ValueError("--where: the expression ends too early")
    kind, value = tokens[0]
    if kind == "word" and value.lower() == "not":
        inner, rest = _term(tokens[1:], params)
        return f"(NOT {inner})", rest
    if kind == "paren" and value == "(":
        inner, rest = _expr(tokens[1:], params)
        if not rest or rest[0] != ("paren", ")"):
            raise ValueError("--where: a '(' is not closed")
        return inner, rest[1:]
    if len(tokens) < 3 or tokens[1][0] != "op" or tokens[2][0] not in ("word", "value"):
        raise ValueError(f"--where: expected FIELD OP VALUE at '{value}' (e.g. confidence<0.5)")
    field, op, raw = value.lower(), tokens[1][1], tokens[2][1]
    if field not in FIELDS:
        raise ValueError(f"--where: unknown field '{value}'; one of {', '.join(sorted(FIELDS))}")
    params.append(_number(raw, value) if field in NUMBERS else raw)
    return f"{field} {'!=' if op == '!=' else op} {PLACEHOLDER}", tokens[3:]


def _number(raw: str, field: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"--where: {field} takes a number, got '{raw}'") from None


def parse_since(text: str) -> float:
    """Unix time from '30m' / '2h' / '1d' ago or an ISO date-time ('2026-12-01T05:00', local time)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        return time.time() - float(match.group(1)) * UNITS[match.group(2)]
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text.strip(), layout))
        except ValueError:
            continue
    raise ValueError(f"--since: '{text}' is neither a duration (30m, 2h, 1d) nor a date-time (2026-12-01T05:00)")


def export_captures(log_target, out_dir: Path, where: str | None = None, since: str | None = None,
                    by: str = "label") -> dict:
    """Copy the captured inputs of matching predictions to out_dir/train/<class>/ (class: the
    fed-back label, or the predicted class when none was given, or always the predicted one with
    by="predicted") and list them in out_dir/predictions.csv. `log_target`: the SQLite file or the
    PostgreSQL URL given to `serve --log-db`. Returns counts."""
    if by not in ("label", "predicted"):
        raise ValueError(f"by must be label or predicted, got '{by}'")
    if str(log_target).startswith(("http://", "https://")):
        raise ValueError("monitor export reads the prediction log itself: pass the SQLite file or the "
                         "postgresql:// URL given to `serve --log-db`, not the server's address")
    rows = _matching(log_target, where, since)
    out_dir = Path(out_dir)
    written, missing = [], 0
    for request_id, item, when, predicted, confidence, label, state, capture, source in rows:
        if source is None:
            missing += 1  # removed by retention meanwhile
            continue
        cls = label if (by == "label" and label) else predicted
        target = out_dir / "train" / _safe(cls) / capture
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        else:
            target.write_bytes(source)
        written.append([target.relative_to(out_dir).as_posix(), predicted, label or "", confidence, state,
                        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", "label", "confidence", "state", "time"])
        writer.writerows(written)
    return {"matched": len(rows), "written": len(written), "missing": missing,
            "classes": len({w[0].split("/")[1] for w in written})}


def _matching(log_target, where: str | None, since: str | None) -> list[tuple]:
    """The captured predictions matching the filters, oldest first, each with where its file is:
    its path in the folder beside an SQLite log, or its bytes from PostgreSQL's captures table
    (None when retention removed it)."""
    postgres = is_url(log_target)
    p = "%s" if postgres else "?"
    conditions, params = ["capture IS NOT NULL"], []
    if where:
        sql, more = parse_where(where, p)
        conditions.append(sql)
        params += more
    if since:
        conditions.append(f"time >= {p}")
        params.append(parse_since(since))
    columns = "request_id, item, time, predicted, confidence, label, state, capture"
    if postgres:
        query = (f"SELECT {columns}, captures.data FROM predictions LEFT JOIN captures ON captures.name = capture "
                 f"WHERE {' AND '.join(conditions)} ORDER BY id")
    else:
        recover(Path(log_target))  # rows a killed server left in the journal
        query = f"SELECT {columns} FROM predictions WHERE {' AND '.join(conditions)} ORDER BY id"
    con, _ = connect(log_target, readonly=True)
    try:
        rows = con.execute(query, params).fetchall()
    finally:
        con.close()
    if postgres:
        return [(*row[:-1], None if row[-1] is None else bytes(row[-1])) for row in rows]
    folder = Path(log_target).with_name(Path(log_target).name + ".captures")
    return [(*row, folder / row[-1] if (folder / row[-1]).is_file() else None) for row in rows]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._ -]", "_", name) or "_"
