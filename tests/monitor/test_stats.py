"""Every drift and input statistic against an independent computation (scipy, sklearn, torch)."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import accuracy_score, recall_score
from sklearn.metrics.pairwise import rbf_kernel

from cvrecipe.evaluate.calibration import reliability
from cvrecipe.monitor import stats
from cvrecipe.monitor.live import accuracy_figures

RNG = np.random.default_rng(0)


def test_psi_is_the_symmetric_kl_divergence_of_scipy():
    r, l = RNG.integers(1, 100, 10), RNG.integers(1, 100, 10)
    p, q = r / r.sum(), l / l.sum()
    assert stats.psi(r, l) == pytest.approx(sps.entropy(q, p) + sps.entropy(p, q), rel=1e-12)
    assert stats.psi(r, r * 3) == pytest.approx(0.0, abs=1e-12)
    assert stats.psi([10, 0], [5, 5]) > 1  # an empty reference bin: large but finite


def test_js_distance_matches_its_definition():
    r, l = RNG.integers(0, 50, 8), RNG.integers(0, 50, 8)
    p, q = r / r.sum(), l / l.sum()
    m = (p + q) / 2
    expected = np.sqrt((sps.entropy(p, m, base=2) + sps.entropy(q, m, base=2)) / 2)
    assert stats.js_distance(r, l) == pytest.approx(expected, rel=1e-9)
    assert stats.js_distance(r, l) == pytest.approx(jensenshannon(p, q, base=2), rel=1e-12)


def test_ks_and_wasserstein_are_scipys():
    a, b = RNG.normal(0, 2, 400), RNG.normal(0.5, 2, 300)
    d, p = stats.ks(a, b)
    ref = sps.ks_2samp(a, b, method="asymp")
    assert (d, p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    exact = sps.ks_2samp(a, b, method="exact").pvalue  # the asymptotic p-value is close to the exact one
    assert p == pytest.approx(exact, rel=0.2, abs=1e-4)
    # the empirical CDFs' largest gap, computed by hand
    grid = np.sort(np.concatenate([a, b]))
    gap = np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a) - np.searchsorted(np.sort(b), grid, "right") / len(b))
    assert d == pytest.approx(gap.max())
    assert stats.wasserstein(a, b) == pytest.approx(sps.wasserstein_distance(a, b) / a.std())


def test_mmd2_matches_sklearns_rbf_kernel():
    x, y = RNG.normal(size=(60, 5)), RNG.normal(0.3, 1, size=(40, 5))
    bandwidth = 1.7
    gamma = 1 / (2 * bandwidth ** 2)
    expected = rbf_kernel(x, x, gamma=gamma).mean() + rbf_kernel(y, y, gamma=gamma).mean() \
        - 2 * rbf_kernel(x, y, gamma=gamma).mean()
    # the kernel is evaluated in float32: the terms agree with sklearn's float64 to ~1e-7
    assert stats.rbf_mmd2(x, y, bandwidth) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    kxx = stats.mean_rbf(x, x, bandwidth)
    assert kxx == pytest.approx(rbf_kernel(x, x, gamma=gamma).mean(), rel=1e-6)
    assert stats.rbf_mmd2(x, y, bandwidth, kxx) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(60, 1)]
    assert stats.median_bandwidth(x) == pytest.approx(np.median(d))


def test_ece_matches_the_report_calibration():
    logits = torch.from_numpy(RNG.normal(size=(500, 4)) * 2)
    y = torch.from_numpy(RNG.integers(0, 4, 500))
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    ours = stats.ece(conf.numpy(), (pred == y).numpy().astype(float))
    assert ours == pytest.approx(reliability(logits, y)["ece"], rel=1e-6)  # it softmaxes in float32


def test_accuracy_and_recall_match_sklearn():
    pred, label = RNG.integers(0, 3, 200), RNG.integers(0, 3, 200)
    labelled = [(0.0, int(p), int(t), 0.9) for p, t in zip(pred, label)]
    out = accuracy_figures(labelled, ["a", "b", "c"])
    assert out["accuracy"] == pytest.approx(accuracy_score(label, pred))
    recall = recall_score(label, pred, average=None)
    assert [out["per_class_recall"][c] for c in "abc"] == pytest.approx(list(recall))
    assert accuracy_figures([], ["a"])["accuracy"] is None


def test_input_statistics_against_scipy_and_torch():
    x = RNG.integers(0, 256, size=(5, 3, 20, 24), dtype=np.uint8)
    out = stats.input_stats(x)
    f = x.astype(np.float64) / 255
    luma = 0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2]
    assert out["brightness"] == pytest.approx(luma.mean((1, 2)), abs=1e-6)
    assert out["contrast"] == pytest.approx(luma.std((1, 2)), abs=1e-6)
    lap = [ndimage.laplace(img)[1:-1, 1:-1].var() for img in luma]
    assert out["sharpness"] == pytest.approx(lap, rel=1e-4)
    assert out["channel1_mean"] == pytest.approx(torch.from_numpy(f[:, 1]).mean((1, 2)).numpy(), abs=1e-6)
    gray = stats.input_stats(x[:, :1])
    assert gray["brightness"] == pytest.approx(f[:, 0].mean((1, 2)), abs=1e-6) and "channel0_mean" not in gray  # = brightness


def test_detectors_wait_for_enough_samples_and_skip_missing_statistics():
    from cvrecipe.monitor import drift
    from cvrecipe.monitor.profile import build_profile

    x = RNG.integers(0, 256, size=(400, 1, 8, 8), dtype=np.uint8)
    logits = RNG.normal(size=(400, 3))
    ref = drift.Reference(build_profile(x, logits, ["a", "b", "c"]))
    live = stats.input_stats(x[:60])
    live["size"] = np.full(60, 8.0)
    live["brightness"][:20] = np.nan  # statistics lost for 20 images: 40 left, below min_samples
    out = {d["quantity"]: d for d in drift.detect(ref, logits[:60].argmax(1), stats.softmax(logits[:60]).max(1),
                                                  live, logits[:60], min_samples=50)}
    assert out["brightness"]["state"] == "waiting" and out["contrast"]["state"] in ("ok", "warn", "alert")
    assert out["embedding"]["state"] == "ok"  # same draws as the reference: calibrated at n=50
    few = drift.detect(ref, logits[:10].argmax(1), stats.softmax(logits[:10]).max(1), live, logits[:10], 50)
    assert {d["state"] for d in few} == {"waiting"}


def test_the_embedding_detector_uses_features_when_the_profile_and_the_window_have_them():
    from cvrecipe.monitor import drift
    from cvrecipe.monitor.profile import build_profile

    x = RNG.integers(0, 256, size=(400, 1, 8, 8), dtype=np.uint8)
    logits, features = RNG.normal(size=(400, 3)), RNG.normal(size=(400, 24))
    ref = drift.Reference(build_profile(x, logits, ["a", "b", "c"], features=features))
    live = stats.input_stats(x[:100])

    def embedding(**kw):
        out = drift.detect(ref, logits[:100].argmax(1), stats.softmax(logits[:100]).max(1), live, logits[:100], 50, **kw)
        return next(d for d in out if d["quantity"] == "embedding")

    assert embedding(features=features[:100])["space"] == "features-pca"
    assert embedding(features=features[:100])["state"] == "ok"
    shifted = embedding(features=features[:100] + 3.0)
    assert shifted["state"] == "alert" and shifted["score"] > shifted["alert"]
    assert embedding()["space"] == "logits-pca"  # a served file without features (TorchScript)


def test_the_pixel_detectors_of_a_segmentation_profile():
    """Class mix of pooled pixels (PSI) and the KS test of per-image mean confidence, against scipy."""
    from types import SimpleNamespace

    from cvrecipe.monitor import drift
    from cvrecipe.monitor.profile import build_pixel_profile

    counts, confidence = RNG.integers(100, 1000, (30, 3)), RNG.uniform(0.6, 1.0, 30)
    ref = drift.reference_for(build_pixel_profile(counts, confidence, ["bg", "disc", "square"]))
    assert isinstance(ref, drift.PixelReference)
    live = [SimpleNamespace(pixels=c, confidence=p) for c, p in zip(RNG.integers(100, 1000, (40, 3)),
                                                                     RNG.uniform(0.5, 0.9, 40))]
    out = {d["quantity"]: d for d in ref.detect(live, min_samples=20)}
    pooled = np.sum([s.pixels for s in live], 0)
    p, q = counts.sum(0) / counts.sum(), pooled / pooled.sum()
    assert out["class_mix"]["score"] == pytest.approx(sps.entropy(q, p) + sps.entropy(p, q), rel=1e-9)
    expected = sps.ks_2samp(confidence, [s.confidence for s in live], method="asymp")
    assert out["confidence"]["score"] == pytest.approx(expected.statistic)
    assert out["confidence"]["p_value"] == pytest.approx(expected.pvalue)
    assert {d["state"] for d in ref.detect(live[:5], min_samples=20)} == {"waiting"}
