"""Decode rate of an image archive into the uint8 cache, and the cached reload time.

    python bench/ingest.py [--data folder:../shared/data/cifar10-jpeg.tar.gz] [--repeats 3]

Each repeat decodes into a fresh, empty cache directory (so nothing is reused), then reloads
from that cache. Prints images/s for decoding (including reading and un-gzipping the archive)
and seconds for the reload.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cvrecipe.config import DataConfig
from cvrecipe.data import load_source

DEFAULT = f"folder:{Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT, help="dataset to ingest (default: the CIFAR-10 JPEG archive)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-cache decodes to time")
    args = parser.parse_args()
    rates, reloads = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cfg = DataConfig(name=args.data, cache_dir=cache)
            t0 = time.perf_counter()
            ds = load_source(args.data, cfg)
            decode_s = time.perf_counter() - t0
            n = sum(len(s) for s in (ds.train, ds.val, ds.test) if s is not None)
            t0 = time.perf_counter()
            load_source(args.data, cfg)
            reloads.append(time.perf_counter() - t0)
            rates.append(n / decode_s)
    print(f"data: {args.data}  images: {n}  torch threads: {torch.get_num_threads()}")
    print(f"decode: {statistics.mean(rates):,.0f} ± {statistics.stdev(rates) if len(rates) > 1 else 0:,.0f} images/s "
          f"(n={len(rates)})")
    print(f"cached reload: {statistics.mean(reloads):.3f} s (max {max(reloads):.3f} s)")


if __name__ == "__main__":
    main()
