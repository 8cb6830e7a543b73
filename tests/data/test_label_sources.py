"""Where the label-error ranking takes its out-of-sample probabilities: a classifier's own
predictions on the splits it never trained on, the K-fold probe on every other image; cleanlab
judged once per source (checked against cleanlab itself, run on each source alone)."""
import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from rich.console import Console

from cvrecipe.data import label_issues as L
from cvrecipe.data.audit import Index
from cvrecipe.data.embed import Embedder
from cvrecipe.data.embedding_audit import label_errors

CLASSES = ["a", "b", "c"]


def blobs(rng, n):
    """(n, 16) unit vectors around 3 class centres, their labels, 5 % of the labels flipped."""
    y = np.arange(n) % 3
    x = np.eye(16)[y] * 3 + rng.normal(size=(n, 16))
    flipped = rng.choice(n, n // 20, replace=False)
    y[flipped] = (y[flipped] + 1) % 3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def softmax_of(rng, y_true, n):
    logits = np.eye(3)[y_true] * 4 + rng.normal(size=(n, 3))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_held_out_split_uses_the_models_predictions_and_cleanlab_per_source():
    rng = np.random.default_rng(0)
    (train_e, train_y), (test_e, test_y) = blobs(rng, 300), blobs(rng, 120)
    truth = np.arange(120) % 3
    test_p = softmax_of(rng, truth, 120)  # the classifier's own view: the true classes
    asked = []

    def probabilities(x, hflip_ok):
        asked.append((len(x), hflip_ok))
        return test_p

    images = lambda n: np.zeros((n, 1, 4, 4), np.uint8)  # noqa: E731 (pixels unused: embeddings given)
    index = Index(None, None, parts=[("train", images(300), train_y), ("test", images(120), test_y)], classes=CLASSES)
    embedder = Embedder("fake", lambda x: x, classes=CLASSES, probabilities=probabilities, held_out=frozenset({"test"}))
    found = label_errors(index, np.concatenate([train_e, test_e]), Console(quiet=True), {}, embedder, hflip_ok=False)

    assert asked == [(120, False)]  # only the held-out split, with the dataset's mirroring rule
    assert found["sources"] == {"train": "probe", "test": "model"}
    rows = {(r[0], r[1]): r for r in found["table"]}  # (id, split, label, suggested, quality, flagged)
    test_flagged = {int(k.split(":")[1]) for (k, s), r in rows.items() if s == "test" and r[5]}
    assert test_flagged == set(find_label_issues(test_y, test_p, filter_by="prune_by_noise_rate").nonzero()[0])
    assert test_flagged == set(np.flatnonzero(test_y != truth))  # the model's view finds the flips
    train_p = L.oof_probabilities(L.standardise(train_e), train_y, num_classes=3)  # the probe on train alone
    quality = get_label_quality_scores(train_y, train_p, method="self_confidence")
    got = np.array([rows[(f"train:{i}", "train")][4] for i in range(300)])
    np.testing.assert_allclose(got, quality, atol=1e-4)
    assert found["accuracy"]["test"] == round(float((test_p.argmax(1) == test_y).mean()), 4)
    qualities = [r[4] for r in found["table"]]
    flagged = sum(r[5] for r in found["table"])
    assert qualities[:flagged] == sorted(qualities[:flagged]) and qualities[flagged:] == sorted(qualities[flagged:])


def test_a_classifier_of_other_classes_is_not_asked():
    rng = np.random.default_rng(1)
    (train_e, train_y), (test_e, test_y) = blobs(rng, 150), blobs(rng, 60)
    index = Index(None, None, parts=[("train", np.zeros((150, 1, 4, 4), np.uint8), train_y),
                                     ("test", np.zeros((60, 1, 4, 4), np.uint8), test_y)], classes=CLASSES)

    def probabilities(x, hflip_ok):
        raise AssertionError("asked for predictions over other classes")

    embedder = Embedder("fake", lambda x: x, classes=["x", "y", "z"], probabilities=probabilities,
                        held_out=frozenset({"test"}))
    found = label_errors(index, np.concatenate([train_e, test_e]), Console(quiet=True), {}, embedder)
    assert found["sources"] == {"train": "probe", "test": "probe"}
