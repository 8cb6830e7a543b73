"""The embedding audit on generated data: planted copies (resized, recompressed, mirrored, cropped,
re-toned) are found and nothing else; planted label flips are ranked first; the fused K-fold probe
equals K separate sklearn fits; data.exclude keeps the listed images out of training; eval scores
without the leaked test images; the report's pair and label-error grids render in Chromium."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cvrecipe.cli import main
from cvrecipe.config import DataConfig
from cvrecipe.data import load_dataset, load_source
from cvrecipe.data import label_issues as L
from cvrecipe.data import neardup as N
from cvrecipe.data.exclusions import apply_exclude, write_record

from pagecheck import view_page
from planted_data import make_folder, picture, variants


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "data"
    return root, make_folder(root)


@pytest.fixture(scope="module")
def inspected(planted, tmp_path_factory):
    """`data inspect --embed` once: (its embedding section, the output folder, what was planted)."""
    root, truth = planted
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVRECIPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["data", "inspect", f"folder:{root}", "--out", str(out), "--embed"]) == 0
    return json.loads((out / "audit.json").read_text())["embedding"], out, truth


def test_planted_copies_are_found_and_nothing_else(inspected):
    result, _, truth = inspected
    found = {frozenset((e["a"]["file"], e["b"]["file"])) for e in result["near_duplicates"]["examples"]}
    planted = {frozenset(p) for p in (*truth["leaks"].items(), *truth["within"].items())}
    assert found == planted  # 5 copies in test (one per kind of change), 2 within train, no false pair
    assert sorted(result["near_duplicates"]["leak_ids"]["test"]) == sorted(truth["leaks"])
    first = result["near_duplicates"]["examples"][:len(truth["leaks"])]
    assert all({e["a"]["split"], e["b"]["split"]} == {"train", "test"} for e in first)  # leakage listed first


def test_planted_label_flips_are_ranked_first(inspected):
    result, _, truth = inspected
    ranked = result["label_issues"]["ranked"]
    assert {r["file"] for r in ranked[:len(truth["flips"])]} == set(truth["flips"])
    for r in ranked[:len(truth["flips"])]:
        assert r["flagged"] and r["suggested"] != r["label"]


def test_pixel_check_sees_through_mirror_shift_and_tone():
    rng = np.random.default_rng(3)
    base = picture(rng, "red")
    copies = [v for v, _ in variants(base).values() if v.shape == base.shape]
    shifted = np.roll(base, (2, -1), axis=(0, 1))
    others = [picture(rng, "red") for _ in range(20)]
    images = np.stack([base, *copies, shifted, *others]).transpose(0, 3, 1, 2)
    thumbs = N.thumbnails(images)
    n_copies = len(copies) + 1
    ncc = N.pixel_correlation(thumbs, np.zeros(len(images) - 1, np.int64), np.arange(1, len(images)))
    assert (ncc[:n_copies] > 0.9).all(), ncc[:n_copies]
    assert (ncc[n_copies:] < 0.8).all(), ncc[n_copies:]


def test_fused_probe_equals_separate_sklearn_fits():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = L.standardise(rng.normal(size=(240, 12)) + np.eye(3)[y] @ rng.normal(size=(3, 12)))
    fold = L.fold_ids(y, 4)
    ours = L.oof_probabilities(x, y, folds=4, fold=fold, c=0.5, max_iter=500)
    reference = np.zeros_like(ours)
    for k in range(4):
        fit = LogisticRegression(C=0.5, tol=1e-8, max_iter=5000).fit(x[fold != k], y[fold != k])
        reference[fold == k] = fit.predict_proba(x[fold == k])
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_exclude_file_keeps_images_out_of_training(planted, tmp_path):
    root, truth = planted
    listed = tmp_path / "exclude.txt"
    listed.write_text("# comment\n" + "\n".join(f"{f}  # planted" for f in truth["flips"]) + "\ntest/red/000.jpg\n")
    cfg = DataConfig(name=f"folder:{root}", cache_dir=str(tmp_path / "cache"), val_fraction=0)
    full, kept = load_dataset(cfg), load_dataset(DataConfig(**{**cfg.__dict__, "exclude": str(listed)}))
    assert len(kept.train) == len(full.train) - len(truth["flips"])
    assert len(kept.test) == len(full.test)  # the test split is never changed
    flipped = {bytes(full.train.x[i]) for i in range(len(full.train))} - {bytes(x) for x in kept.train.x}
    assert len(flipped) == len(truth["flips"])
    listed.write_text("train/red/no-such-file.jpg\n")
    with pytest.raises(ValueError, match="match no train/val image"):
        apply_exclude(load_source(cfg.name, cfg), listed)


@pytest.mark.slow
def test_training_without_excluded_digits(tmp_path):
    listed = tmp_path / "exclude.txt"
    listed.write_text("\n".join(f"train:{i}" for i in range(100)) + "\n")
    common = ["train.epochs=1", "train.sanity=false", f"runs_dir={tmp_path}", "data.val_fraction=0"]
    assert main(["train", "digits-quick", *common, "name=all"]) == 0
    assert main(["train", "digits-quick", *common, "name=kept", f"data.exclude={listed}"]) == 0
    trained = {name: json.loads((tmp_path / name / "run.json").read_text())["dataset"] for name in ("all", "kept")}
    assert trained["kept"]["train"] == trained["all"]["train"] - 100
    assert trained["kept"]["test"] == trained["all"]["test"]
    full = load_dataset(DataConfig(name="digits", val_fraction=0))
    kept = load_dataset(DataConfig(name="digits", val_fraction=0, exclude=str(listed)))
    assert np.array_equal(kept.train.x, full.train.x[100:])


@pytest.mark.slow
def test_eval_scores_without_leaked_test_images(tmp_path, capsys):
    common = ["train.epochs=1", "train.sanity=false", f"runs_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "digits-quick", *common, "name=r"]) == 0
    ds = load_dataset(DataConfig(name="digits", cache_dir=str(tmp_path / "cache")))
    leaks = list(range(0, len(ds.test), 7))
    write_record(tmp_path / "cache", "digits", len(ds.test), leaks, tmp_path)
    from cvrecipe.artifact.checkpoint import load_model
    from cvrecipe.artifact.inference import predict_logits
    from cvrecipe.evaluate.job import evaluate

    result = evaluate(tmp_path / "r")
    pred = predict_logits(load_model(tmp_path / "r"), ds.test.x).argmax(1).numpy()
    keep = np.setdiff1d(np.arange(len(ds.test)), leaks)
    assert result["leak_free"]["leaked"] == len(leaks) and result["leak_free"]["num_images"] == len(keep)
    assert result["leak_free"]["metrics"]["accuracy"] == pytest.approx((pred[keep] == ds.test.y[keep]).mean())
    assert result["accuracy"] == pytest.approx((pred == ds.test.y).mean())
    assert "without the" in capsys.readouterr().out


def test_report_shows_pairs_and_label_errors_in_a_browser(inspected, tmp_path):
    result, out, truth = inspected
    assert result["near_duplicates"]["pairs"] == len(truth["leaks"]) + len(truth["within"])
    listed = [line.split("#")[0].strip() for line in (out / "leaks.txt").read_text().splitlines()[1:]]
    assert sorted(listed) == sorted(truth["leaks"])
    excluded = (out / "exclude.txt").read_text()
    assert all(f in excluded for f in truth["flips"]) and all(f in excluded for f in truth["leaks"].values())
    info = view_page(out / "report.html", tmp_path / "page.png")
    assert {"Near duplicates by embedding", "Likely label errors"} <= set(info["headings"])
    pairs = [i for i in info["images"] if i["alt"] == "duplicate pair"]
    errors = [i for i in info["images"] if i["alt"] == "label error candidate"]
    assert len(pairs) >= 7 + 1 and len(errors) >= len(truth["flips"])  # + the hash audit's pairs
    assert all(i["width"] > 0 and i["shown"] > 0 for i in pairs + errors)


@pytest.mark.slow
def test_export_folder_audited_against_a_reference(planted, tmp_path, monkeypatch):
    root, truth = planted
    import shutil

    export = tmp_path / "export"
    for k, rel in enumerate(["train/red/001.jpg", "train/green/003.jpg"]):
        (export / "train" / rel.split("/")[1]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, export / "train" / rel.split("/")[1] / f"capture-{k}.jpg")
    (export / "train" / "blue").mkdir(parents=True)
    shutil.copy(root / "test/blue/000.jpg", export / "train" / "blue" / "new.jpg")  # in the reference's test only
    monkeypatch.setenv("CVRECIPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    assert main(["data", "inspect", f"folder:{export}", "--out", str(out), "--embed", "--reference",
                 f"folder:{root}"]) == 0
    audit = json.loads((out / "audit.json").read_text())
    pairs = {(e["a"]["id"], e["b"]["id"]) for e in audit["embedding"]["near_duplicates"]["examples"]
             if e["b"]["split"] == "train" and e["a"]["split"] == "reference train"}
    assert pairs == {("reference:train/red/001.jpg", "train/red/capture-0.jpg"),
                     ("reference:train/green/003.jpg", "train/green/capture-1.jpg")}
    assert "new.jpg" not in (out / "exclude.txt").read_text() and "capture-0.jpg" in (out / "exclude.txt").read_text()


def test_pixel_correlation_equals_the_explicit_loop():
    rng = np.random.default_rng(5)
    thumbs = torch.from_numpy(rng.uniform(0, 255, (12, 32, 32)).astype(np.float32))
    i, j = rng.integers(0, 12, 20), rng.integers(0, 12, 20)

    def loop(a, b):  # Pearson correlation of a's centre with each shifted window of b and its mirror
        centre = a[2:30, 2:30].flatten().double()
        return max(float(np.corrcoef(centre, view[dy:dy + 28, dx:dx + 28].flatten().double())[0, 1])
                   for view in (b, b.flip(-1)) for dy in range(5) for dx in range(5))

    expected = [loop(thumbs[a], thumbs[b]) for a, b in zip(i, j)]
    np.testing.assert_allclose(N.pixel_correlation(thumbs, i, j), expected, atol=1e-5)


def test_bench_scores_an_audit_against_public_style_lists(planted, inspected, tmp_path):
    """bench/audit.py at its smallest: score the planted audit with lists in ciFAIR's and
    cleanlab/label-errors' formats, written here for the planted folder."""
    import subprocess
    import sys

    root, _ = planted
    _, out, truth = inspected
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    number = {f: k for k, f in enumerate(files)}
    (tmp_path / "index.csv").write_text("file,split,original_index\n" + "".join(
        f"{f},{f.split('/')[0]},{number[f]}\n" for f in files))
    (tmp_path / "dups.csv").write_text("TestID,TrainID,Distance,Judgment\n" + "".join(
        f"{number[t]},{number[s]},0.1,1\n" for t, s in truth["leaks"].items()))
    tests = [f for f in files if f.startswith("test/")][:3]
    (tmp_path / "mturk.json").write_text(json.dumps([{"id": number[f], "mturk": {"given": g, "guessed": 5 - g}}
                                                     for f, g in zip(tests, (0, 1, 4))]))
    bench = Path(__file__).resolve().parents[2] / "bench" / "audit.py"
    run = subprocess.run([sys.executable, str(bench), "--data", f"folder:{root}", "--index", str(tmp_path / "index.csv"),
                          "--cifair", str(tmp_path / "dups.csv"), "--mturk", str(tmp_path / "mturk.json"),
                          "--audit", str(out)], capture_output=True, text=True, check=True)
    n = len(truth["leaks"])
    assert f"of ciFAIR's test images                  {n} / {n} (100.0%)" in run.stdout, run.stdout
    assert "confirmed errors in the top 275          2 / 2 (100.0%)" in run.stdout, run.stdout  # 41 test images < 275


def test_sanity_checks_warn_on_test_leakage(tmp_path):
    from cvrecipe.config import load_config
    from cvrecipe.train.sanity import check_test_leakage

    cfg = load_config("digits-quick", [f"data.cache_dir={tmp_path}"])
    ds = load_dataset(cfg.data)
    assert check_test_leakage(cfg, ds) == []  # no audit, no check
    n = len(ds.test)
    write_record(tmp_path, "digits", n, list(range(int(0.05 * n))), tmp_path)
    (result,) = check_test_leakage(cfg, ds)
    assert result.status == "warn" and result.values["leaked"] == int(0.05 * n)
    write_record(tmp_path, "digits", n, [0], tmp_path)
    assert check_test_leakage(cfg, ds)[0].status == "pass"
    write_record(tmp_path, "digits", n + 1, list(range(n)), tmp_path)  # written for other data: ignored
    assert check_test_leakage(cfg, ds) == []
