"""The command line of monitoring: `cvrecipe monitor profile|export|URL` and `serve`'s options."""
from __future__ import annotations

import argparse
from pathlib import Path

from cvrecipe.monitor.settings import MonitorSettings


def add_serve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring (see docs/monitoring.md)")
    g.add_argument("--no-monitor", action="store_true", help="no drift, feedback, log or dashboard")
    g.add_argument("--window", type=int, default=500, help="predictions in the monitoring window (default 500)")
    g.add_argument("--window-s", type=float, default=3600, help="... none older than this (default 3600 s)")
    g.add_argument("--alert-webhook", metavar="URL", help="POST a JSON alert here when the drift state changes")
    g.add_argument("--log-db", metavar="FILE_OR_URL",
                   help="prediction log: an SQLite file (WAL mode), or postgresql://USER@HOST:PORT/DB shared by "
                        "several servers")
    g.add_argument("--capture", type=float, default=0.0, metavar="PERCENT",
                   help="save this share of input images beside the log, for `monitor export` (default 0)")
    g.add_argument("--log-max-rows", type=int, help="retention: keep at most this many log rows")
    g.add_argument("--log-max-age-days", type=float, help="retention: drop log rows older than this")


def settings_from_args(args: argparse.Namespace) -> MonitorSettings:
    age = args.log_max_age_days * 86400 if args.log_max_age_days is not None else None
    return MonitorSettings(enabled=not args.no_monitor, window=args.window, window_s=args.window_s,
                           alert_webhook=args.alert_webhook, log_db=args.log_db, capture_percent=args.capture,
                           log_max_rows=args.log_max_rows, log_max_age_s=age)


def add_parser(verbs) -> None:
    p = verbs.add_parser("monitor", help="watch a server live, profile a run, export logged inputs",
                         description="`cvrecipe monitor URL` shows a server's drift, accuracy and resources live; "
                                     "`monitor profile RUN` writes the reference profile drift is measured "
                                     "against; `monitor export LOG DIR` writes captured inputs as a folder: dataset.")
    sub = p.add_subparsers(dest="monitor_verb", required=True, metavar="ACTION")
    q = sub.add_parser("watch", help="live view of a server (`cvrecipe monitor URL` is short for this)")
    q.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    q.add_argument("--once", action="store_true", help="print once and exit")
    q = sub.add_parser("profile", help="write RUN/export/profile.json from the run's held-out split")
    q.add_argument("run", type=Path, help="run folder")
    q.add_argument("--max-images", type=int, default=3000, help="held-out images used (default 3000)")
    q.add_argument("--out", type=Path, help="folder to write profile.json in (default RUN/export)")
    q = sub.add_parser("export", help="captured inputs of selected predictions → DIR/train/<class>/ (+ predictions.csv)")
    q.add_argument("log", help="the prediction log given to `serve --log-db`: the SQLite file or the postgresql:// URL")
    q.add_argument("out", type=Path, help="output folder (a folder: dataset)")
    q.add_argument("--where", help="filter, e.g. \"state=alert or confidence<0.5\"")
    q.add_argument("--since", help="only predictions since: 30m, 2h, 1d or 2026-12-01T05:00")
    q.add_argument("--by", choices=["label", "predicted"], default="label",
                   help="class folder: the fed-back label when there is one (default), or always the predicted class")


def expand(argv: list[str]) -> list[str]:
    """`monitor URL ...` → `monitor watch URL ...`."""
    if len(argv) >= 2 and argv[0] == "monitor" and argv[1].startswith(("http://", "https://")):
        return ["monitor", "watch", *argv[1:]]
    return argv


def run(args: argparse.Namespace, console) -> int:
    if args.monitor_verb == "watch":
        from cvrecipe.monitor.terminal import watch

        watch(args.url, args.interval, console, args.once)
    elif args.monitor_verb == "profile":
        from cvrecipe.monitor.profile import profile_run

        path = profile_run(args.run, args.out, args.max_images)
        console.print(f"reference profile written to {path}", highlight=False)
    else:
        from cvrecipe.monitor.export import export_captures

        counts = export_captures(args.log, args.out, args.where, args.since, args.by)
        console.print(f"{counts['written']} captured inputs of {counts['matched']} matching predictions written to "
                      f"{args.out}/train/ ({counts['classes']} classes; {counts['missing']} captures no longer on "
                      f"disk); list in {args.out / 'predictions.csv'}", highlight=False)
    return 0
