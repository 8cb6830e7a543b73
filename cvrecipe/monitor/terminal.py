"""`cvrecipe monitor URL`: the server's /v1/monitor, live in the terminal (rich)."""
from __future__ import annotations

import json
import time
import urllib.request

from rich.console import Group
from rich.table import Table
from rich.text import Text

STYLE = {"ok": "green", "warn": "yellow", "alert": "bold red", "waiting": "dim"}


def fetch(url: str, timeout_s: float = 10) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/v1/monitor?fresh=1", timeout=timeout_s) as response:
        return json.loads(response.read())


def _f(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def view(m: dict) -> Group:
    """The report as rich renderables: a headline, drift, class mix, accuracy and resources."""
    res, lat, acc = m["resources"], m["latency_ms"], m["accuracy"]
    head = Text.assemble(("cvrecipe monitor  ", "bold"), f"{m['model'].get('name', '?')} {m['model'].get('version', '')}  ",
                         (m["state"].upper(), STYLE[m["state"]]),
                         f"  window {m['window']['predictions']}/{m['window']['size']}  "
                         f"{_f(m.get('throughput_per_s'))} img/s  p50 {_f(lat['p50'])} ms  p95 {_f(lat['p95'])} ms  "
                         f"CPU {_f(res['cpu_percent'])}%  RSS {res['rss_bytes'] / 2**20:.0f} MiB  "
                         f"threads {res['threads']}")
    drift = Table(title="drift against the reference", title_justify="left")
    for col in ("quantity", "statistic", "score", "warn", "alert", "state"):
        drift.add_column(col, justify="left" if col in ("quantity", "statistic") else "right")
    for d in m["drift"]:
        drift.add_row(d["quantity"], d["statistic"] or "", _f(d["score"]), _f(d.get("warn")), _f(d.get("alert")),
                      Text(d["state"], STYLE[d["state"]]))
    mix = Table(title="class mix (live / reference)", title_justify="left")
    for col in ("class", "live", "reference", ""):
        mix.add_column(col, justify="left" if col in ("class", "") else "right")
    reference = m["class_mix"]["reference"] or [None] * len(m["classes"])
    for name, live, ref in zip(m["classes"], m["class_mix"]["live"], reference):
        mix.add_row(name, f"{live:.3f}", _f(ref, ".3f"), "█" * round(live * 40))
    accuracy = Text(f"live accuracy {_f(acc['accuracy'], '.4f')} on {acc['labelled']} labelled, ECE {_f(acc['ece'])}; "
                    + "  ".join(f"{c} {r:.2f}" for c, r in acc["per_class_recall"].items()))
    return Group(head, drift, mix, accuracy)


def watch(url: str, interval_s: float, console, once: bool = False) -> None:
    if once:
        console.print(view(fetch(url)))
        return
    from rich.live import Live

    with Live(view(fetch(url)), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval_s)
            live.update(view(fetch(url)))
