"""Soak: `cvrecipe serve` under a steady mixed load of good and bad requests, watching its memory.

    python bench/soak.py [--minutes 10] [--concurrency 32] [--every 30] [--code PATH]
    python bench/soak.py --minutes 1        # the short version

Clients send with urllib (the whole body, then read) in a loop: good JPEGs, a 6000x6000 photo now
and then, bodies above the limit, decompression bombs (JPEG, PNG), text, truncated and empty files,
a wrong content type. Every answer is compared with the one its kind should get (200, 413, 400,
415). Prints, every --every seconds, the requests answered so far, the rate, the server's resident
memory and the errors (wrong answers, resets, 5xx); then the memory at the first and last sample
and its peak. Asserts nothing. The load generator shares the machine's cores with the server.
"""
from __future__ import annotations

import argparse
import itertools
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability import (ROOT, cvrecipe, jpeg_declaring, make_image_folder, photo_jpeg, png_declaring,  # noqa: E402
                         post, start_server)


def kinds(good: bytes) -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status): one round of the mix, in order."""
    return [("good", good, "image/jpeg", 200)] * 12 + [
        ("photo 6000x6000", photo_jpeg(), "image/jpeg", 200),
        ("body > 10 MiB", b"\xff" * 11_000_000, "image/jpeg", 413),
        ("JPEG bomb", jpeg_declaring(30_000, 30_000), "image/jpeg", 413),
        ("PNG bomb", png_declaring(20_000, 20_000), "image/png", 413),
        ("text", b"definitely not an image", "image/jpeg", 400),
        ("truncated", good[: len(good) // 2], "image/jpeg", 400),
        ("empty", b"", "image/png", 400),
        ("wrong type", good, "text/plain", 415),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose cvrecipe runs (default: this one)")
    args = parser.parse_args()
    code = args.code.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_image_folder(tmp / "images", per_class={"train": 60, "test": 10}, size=32)
        trained = cvrecipe(code, "train", "digits-quick", f"data.name=folder:{images}", f"runs_dir={tmp / 'runs'}",
                           "name=r", "train.epochs=2", "model.kwargs={width: 8}", "train.sanity=false",
                           f"data.cache_dir={tmp / 'cache'}", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if trained.wait() != 0:
            raise RuntimeError("training the soak's run failed")
        good = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
        mix = kinds(good)
        server, url = start_server(code, tmp / "runs" / "r")
        ps = psutil.Process(server.pid)
        answers: Counter = Counter()
        errors: Counter = Counter()
        lock, stop = threading.Lock(), threading.Event()
        order = itertools.count()

        def client():
            while not stop.is_set():
                name, body, content_type, expected = mix[next(order) % len(mix)]
                got = post(url, body, content_type)
                with lock:
                    answers[name] += 1
                    if got != expected:
                        errors[f"{name}: {got}"] += 1

        print(f"soak: {args.minutes} min at concurrency {args.concurrency}; mix per round: "
              f"{dict(Counter(name for name, *_ in mix))}", flush=True)
        print(f"{'t (s)':>7} {'answered':>9} {'req/s':>7} {'RSS (MB)':>9} {'errors':>7}", flush=True)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        samples, last_n, last_t = [], 0, start
        try:
            while time.perf_counter() - start < args.minutes * 60:
                time.sleep(min(args.every, max(0.0, args.minutes * 60 - (time.perf_counter() - start))))
                now, rss = time.perf_counter(), ps.memory_info().rss / 2**20
                with lock:
                    n, bad = sum(answers.values()), sum(errors.values())
                samples.append(rss)
                print(f"{now - start:7.0f} {n:9,} {(n - last_n) / (now - last_t):7.1f} {rss:9,.0f} {bad:7}", flush=True)
                last_n, last_t = n, now
        finally:
            stop.set()
            for t in threads:
                t.join(180)
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        print(f"answered {sum(answers.values()):,} requests: {dict(answers)}")
        print(f"errors (wrong answer, reset or 5xx): {sum(errors.values())} {dict(errors) if errors else ''}")
        if samples:
            print(f"server RSS: {samples[0]:,.0f} MB at the first sample, {samples[-1]:,.0f} MB at the last, "
                  f"peak {max(samples):,.0f} MB")


if __name__ == "__main__":
    main()
