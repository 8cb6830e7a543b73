"""The embedding audit scored against the public audits of CIFAR-10.

    python bench/audit.py --data folder:PATH --index cifar10-jpeg-original-index.csv \\
        --cifair duplicates_cifar10.csv --mturk cifar10_mturk.json [--out DIR] [--size 64] \\
        [--embed RUN [--also-probe | --labels-only | --probe-only]] [--threads N] [--review DIR --review-n 60] [--audit DIR]

Runs `cvrecipe data inspect DATA --embed [RUN]` (or, with --audit, scores an audit folder written
before) and prints every figure. With a run trained on DATA, the test images' label-error
probabilities are the run's own predictions (out of sample: it trained on train only);
--also-probe also ranks every image by the K-fold probe on the same features (what the audit does
where the run's predictions are not out of sample), written to label_issues_probe.csv and scored
the same way. --labels-only ranks only the run's held-out splits, by its own predictions (the
audit's label-error stage on those splits alone: cleanlab judges each source apart, so their
ranking is the full audit's), skipping the embeddings and the duplicate search. --probe-only
ranks every image by the probe (the run's predictions unused).

- duplicates: test images flagged as having a near copy in train; of ciFAIR's test images with a
  train duplicate (Barz & Denzler 2020, meta/duplicates_cifar10.csv of github.com/cvjena/cifair:
  TestID,TrainID,Distance,Judgment; Judgment 1 = the same shot, 2 = very similar) how many are
  flagged, overall and for the same-shot ones; how many flagged pairs name ciFAIR's train partner;
- label errors: of Northcutt et al.'s (2021) 275 CIFAR-10 test candidates (mturk/cifar10_mturk.json
  of github.com/cleanlab/label-errors), those confirmed by review (fewer than 3 of 5 workers chose
  the given label: 54), how many are in the top 275 of the audit's ranking of the test images;
- with --review, side-by-side PNGs (test | train partner) of a random sample of the flagged test
  images outside ciFAIR's list, to count true copies by eye.

File names map to CIFAR-10's original indices through --index (file,split,original_index). Neither
public list ships with cvrecipe: pass their paths. Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvrecipe.data.report import inspect_data  # noqa: E402

CANDIDATES = 275  # the size of Northcutt et al.'s candidate list for the CIFAR-10 test set


def read_index(path: Path) -> dict[str, int]:
    with open(path) as f:
        return {row["file"]: int(row["original_index"]) for row in csv.DictReader(f)}


def read_cifair(path: Path) -> dict[int, tuple[int, int]]:
    """{test original index: (train original index, judgment)}."""
    with open(path) as f:
        return {int(r["TestID"]): (int(r["TrainID"]), int(r["Judgment"])) for r in csv.DictReader(f)}


def read_mturk(path: Path) -> tuple[set[int], set[int]]:
    """(all candidates, confirmed errors: fewer than 3 of 5 reviewers chose the given label)."""
    rows = json.loads(Path(path).read_text())
    return {r["id"] for r in rows}, {r["id"] for r in rows if r["mturk"]["given"] < 3}


def score_duplicates(audit: dict, index: dict[str, int], cifair: dict[int, tuple[int, int]]) -> dict:
    nd = audit["embedding"]["near_duplicates"]
    flagged = {index[f] for f in nd["leak_ids"].get("test", [])}
    partners = {(index[e["b"]["id"]], index[e["a"]["id"]]) for e in nd["examples"]
                if e["a"]["split"] == "train" and e["b"]["split"] == "test"}
    same = {t for t, (_, j) in cifair.items() if j == 1}
    return {"test images flagged": len(flagged),
            "of ciFAIR's test images": f"{len(flagged & set(cifair))} / {len(cifair)} "
                                       f"({len(flagged & set(cifair)) / len(cifair):.1%})",
            "of ciFAIR's same-shot": f"{len(flagged & same)} / {len(same)} ({len(flagged & same) / len(same):.1%})",
            "with ciFAIR's train partner listed": sum((t, tr) in partners for t, (tr, _) in cifair.items()),
            "flagged outside ciFAIR's list": len(flagged - set(cifair)),
            "all pairs (any split)": nd["pairs"], "candidate pairs checked": nd["candidates"],
            "rules": nd["rules"]}


def score_labels(out: Path, index: dict[str, int], candidates: set[int], confirmed: set[int],
                 table: str = "label_issues.csv") -> dict:
    with open(out / table) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    top = [index[r["id"]] for r in rows[:CANDIDATES]]
    flagged = sum(r["flagged"] == "1" for r in rows)
    return {"test images flagged by cleanlab": flagged,
            f"confirmed errors in the top {CANDIDATES}": f"{len(set(top) & confirmed)} / {len(confirmed)} "
                                                         f"({len(set(top) & confirmed) / len(confirmed):.1%})",
            f"Northcutt's candidates in the top {CANDIDATES}": f"{len(set(top) & candidates)} / {len(candidates)}"}


def save_review(audit: dict, data: Path, cifair: dict, index: dict[str, int], out: Path, n: int, seed: int = 0) -> int:
    """Side-by-side PNGs (test | train) of n random flagged test images outside ciFAIR's list."""
    nd = audit["embedding"]["near_duplicates"]
    extra = {}
    for e in nd["examples"]:
        if e["a"]["split"] == "train" and e["b"]["split"] == "test" and index[e["b"]["id"]] not in cifair:
            extra.setdefault(e["b"]["id"], e)
    keys = sorted(extra)
    pick = np.random.default_rng(seed).permutation(len(keys))[:n]
    out.mkdir(parents=True, exist_ok=True)
    archive = tarfile.open(data) if data.is_file() else None  # the folder source reads a .tar.gz as it is

    def read(member: str) -> Image.Image:
        return Image.open(archive.extractfile(member) if archive else data / member)

    for k in pick.tolist():
        e = extra[keys[k]]
        a, b = (read(e[s]["id"]).convert("RGB").resize((128, 128), Image.NEAREST) for s in ("b", "a"))
        pair = Image.new("RGB", (262, 128), "white")
        pair.paste(a, (0, 0))
        pair.paste(b, (134, 0))
        pair.save(out / f"{k:04d}_{Path(e['b']['id']).stem}_{e['ncc']:.3f}.png")
    return len(pick)


def probe_alongside(out: Path) -> None:
    """Make the audit's label-error stage also rank every image by the K-fold probe alone, from the
    same embeddings, into out/label_issues_probe.csv (the audit's own output is unchanged)."""
    from cvrecipe.data import embedding_audit as E

    audit_stage = E.label_errors

    def both(index, emb, console, seconds, embedder=None, hflip_ok=True):
        probe = audit_stage(index, emb, console, {}, None, hflip_ok)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "label_issues_probe.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "split", "label", "suggested", "quality", "flagged"])
            writer.writerows(probe["table"])
        print(f"probe alone: accuracy {probe['accuracy']}")
        return audit_stage(index, emb, console, seconds, embedder, hflip_ok)

    E.label_errors = both


def rank_held_out(data: str, embedder, out: Path) -> None:
    """The audit's label-error stage over the run's held-out splits alone, into out/label_issues.csv."""
    from rich.console import Console

    from cvrecipe.config import DataConfig
    from cvrecipe.data import embedding_audit as E
    from cvrecipe.data import load_source
    from cvrecipe.data.audit import Index, folder_files

    ds = load_source(data, DataConfig(name=data))
    names, _ = folder_files(Path(data.split(":", 1)[1]), ds)
    parts = [(s, getattr(ds, s).x, getattr(ds, s).y) for s in ("val", "test")
             if s in embedder.held_out and getattr(ds, s) is not None]
    index = Index(None, names, parts=parts, classes=ds.classes)
    seconds: dict = {}
    found = E.label_errors(index, np.zeros((int(index.offsets[-1]), 1), np.float32), Console(), seconds, embedder,
                           ds.hflip_ok)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "label_issues.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "split", "label", "suggested", "quality", "flagged"])
        writer.writerows(found["table"])
    print(f"held-out splits {[p[0] for p in parts]}: sources {found['sources']}, accuracy {found['accuracy']}, "
          f"stage seconds {seconds}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder:PATH of the CIFAR-10 image folder")
    p.add_argument("--index", type=Path, required=True, help="file,split,original_index CSV")
    p.add_argument("--cifair", type=Path, required=True, help="ciFAIR's duplicates_cifar10.csv")
    p.add_argument("--mturk", type=Path, required=True, help="cleanlab/label-errors' cifar10_mturk.json")
    p.add_argument("--out", type=Path, default=Path("audit-bench"), help="where the audit is written")
    p.add_argument("--audit", type=Path, help="score this audit folder instead of running a new audit")
    p.add_argument("--size", type=int, default=64, help="px side the images are embedded at")
    p.add_argument("--embed", default="lite0", metavar="RUN", help="embed with this run's features (default: lite0)")
    p.add_argument("--also-probe", action="store_true", help="with --embed RUN: also rank every image by the K-fold "
                                                              "probe on the same embeddings (label_issues_probe.csv)")
    p.add_argument("--labels-only", action="store_true", help="with --embed RUN: only the label-error ranking of "
                                                               "the run's held-out splits, by its own predictions")
    p.add_argument("--probe-only", action="store_true", help="with --embed RUN: the K-fold probe for every image")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--review", type=Path, help="save side-by-side PNGs of flags outside ciFAIR's list here")
    p.add_argument("--review-n", type=int, default=60)
    args = p.parse_args()
    if sum((args.also_probe, args.labels_only, args.probe_only)) > 1:
        p.error("--also-probe, --labels-only and --probe-only exclude one another")
    out = args.audit or args.out
    if args.audit is None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        embed = args.embed
        if embed != "lite0":
            from cvrecipe.artifact.features import run_embedder

            embed = run_embedder(embed, None if args.probe_only else args.data)
        if args.also_probe:
            probe_alongside(out)
        if args.labels_only:
            rank_held_out(args.data, embed, out)
        else:
            inspect_data(args.data, out, embed=embed, embed_size=args.size)
        print(f"audit: {time.perf_counter() - t0:.0f}s on {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
              f"load average {os.getloadavg()[0]:.1f}")
    index = read_index(args.index)
    if args.labels_only:
        for key, value in score_labels(out, index, *read_mturk(args.mturk)).items():
            print(f"  {key:40s} {value}")
        return
    audit = json.loads((out / "audit.json").read_text())
    print(f"embedder: {audit['embedding']['embedder']}; stage seconds: {audit['embedding']['seconds']}")
    issues = audit["embedding"]["label_issues"] or {}
    print(f"label-error probabilities: {issues.get('sources')}; accuracy of their top class: {issues.get('accuracy')}")
    cifair = read_cifair(args.cifair)
    for key, value in score_duplicates(audit, index, cifair).items():
        print(f"  {key:40s} {value}")
    for key, value in score_labels(out, index, *read_mturk(args.mturk)).items():
        print(f"  {key:40s} {value}")
    if (out / "label_issues_probe.csv").is_file():
        print("the K-fold probe for every image, on the same embeddings:")
        for key, value in score_labels(out, index, *read_mturk(args.mturk), table="label_issues_probe.csv").items():
            print(f"  {key:40s} {value}")
    if args.review:
        saved = save_review(audit, Path(args.data.split(":", 1)[1]), cifair, index, args.review, args.review_n)
        print(f"saved {saved} pairs outside ciFAIR's list to {args.review}")


if __name__ == "__main__":
    main()
