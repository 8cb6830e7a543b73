"""Our metrics against scikit-learn's on the same predictions."""
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cvrecipe.tasks.classification import classification_metrics


@pytest.mark.parametrize("num_classes, seed", [(3, 0), (10, 1), (10, 2)])
def test_metrics_match_sklearn(num_classes, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, 500)
    logits = rng.normal(size=(500, num_classes))
    logits[np.arange(500), y] += rng.uniform(0, 2.5, 500)  # mostly right, sometimes not
    if num_classes == 10:
        logits[:, 9] -= 8  # class 9 is never predicted: exercises zero_division
    res = classification_metrics(torch.tensor(logits), torch.tensor(y), [str(i) for i in range(num_classes)])
    pred = logits.argmax(1)
    assert num_classes == 3 or 9 not in pred
    labels = list(range(num_classes))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert [c["precision"] for c in res["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in res["per_class"]] == pytest.approx(r)
    assert [c["f1"] for c in res["per_class"]] == pytest.approx(f)
    assert [c["support"] for c in res["per_class"]] == list(s)
    assert res["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    assert res["macro_precision"] == pytest.approx(
        skm.precision_score(y, pred, average="macro", labels=labels, zero_division=0))
    assert res["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert res["loss"] == pytest.approx(skm.log_loss(y, torch.tensor(logits).softmax(1).numpy(), labels=labels),
                                        rel=1e-5)
    if num_classes > 5:
        assert res["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, logits, k=5, labels=labels))
    else:
        assert "top5_accuracy" not in res
