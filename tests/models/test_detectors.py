"""Detectors: each builds offline, trains a step, answers (B, 100, 6); Fast NMS against torchvision's
greedy NMS; the fixed-shape graph exports to ONNX with a dynamic batch and ONNX Runtime finds the
eager model's detections."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from cvrecipe.models import create_model, list_models, model_from_meta
from torchvision.models.detection.image_list import ImageList

from cvrecipe.models.detectors import fast_nms, select_candidates
from cvrecipe.tasks.box_metrics import match_rate

SIZE = 64


def tiny_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    targets = [{"boxes": torch.tensor([[8.0, 10, 40, 50], [30, 5, 60, 25]]), "labels": torch.tensor([2, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without objects
    return x, targets


def test_every_detector_is_listed():
    assert set(list_models("boxes")) == {"fcos-lite0", "fcos-lite0-scratch", "retinanet-lite0", "ssdlite320",
                                             "fasterrcnn-mobilenet320"}


@pytest.mark.parametrize("name", list_models("boxes"))
def test_a_detector_trains_a_step_and_answers_fixed_shape_rows(name):
    torch.manual_seed(0)
    model = create_model(name, 3, 3, (SIZE, SIZE), outputs="boxes")
    x, targets = tiny_batch()
    model.train()
    losses = model(x, targets)
    assert isinstance(losses, dict) and losses and all(torch.isfinite(v) for v in losses.values()), losses
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    sum(losses.values()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01).step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    assert changed > 0
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 100, 6) and torch.isfinite(out).all()
    scores, classes = out[..., 4], out[..., 5]
    assert ((classes == -1) == (scores == 0)).all()  # padding is score 0 and class -1, nothing else
    assert ((classes >= -1) & (classes < 3)).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    real = out[scores > 0]
    assert (real[:, :2] >= 0).all() and (real[:, 2:4] <= SIZE).all()
    with torch.no_grad():  # a size that is no multiple of the strides: padded inside, boxes in its frame
        odd = model(torch.randint(0, 255, (1, 3, 72, 100), dtype=torch.uint8))
    assert odd.shape == (1, 100, 6) and (odd[..., 2] <= 100).all() and (odd[..., 3] <= 72).all()


def test_narrow_fcos_trains_on_one_small_image_and_an_unsplittable_width_is_named():
    """At 32 channels and 64 px the top level (P7) is 1×1: one channel per GroupNorm group would be a
    single value, which torch refuses in training for a batch of one."""
    torch.manual_seed(0)
    model = create_model("fcos-lite0-scratch", 3, 3, (SIZE, SIZE), outputs="boxes", fpn_channels=32)
    model.train()
    x, targets = tiny_batch()
    losses = model(x[:1], targets[:1])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    with pytest.raises(ValueError, match=r"model.kwargs.fpn_channels=48: expected a multiple of 32"):
        create_model("fcos-lite0", 3, 3, (SIZE, SIZE), outputs="boxes", fpn_channels=48)


def test_a_rebuilt_detector_gives_the_same_detections():
    model = create_model("fcos-lite0", 3, 3, (SIZE, SIZE), outputs="boxes").eval()
    assert model.meta["mean"] == [0.5] * 3  # Lite0's own preprocessing travels in the meta
    again = model_from_meta(model.meta).eval()
    again.load_state_dict(model.state_dict())
    x, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))


def candidates(seed: int, batch: int = 4, count: int = 300, classes: int = 5):
    """Sorted candidates as a detector makes them: clusters of jittered boxes around a few objects."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 12, 2, generator=gen) * 200
    sizes = 10 + torch.rand(batch, 12, 2, generator=gen) * 60
    which = torch.randint(0, 12, (batch, count), generator=gen)
    c = centres.gather(1, which[..., None].expand(-1, -1, 2)) + torch.randn(batch, count, 2, generator=gen) * 4
    s = sizes.gather(1, which[..., None].expand(-1, -1, 2)) * (1 + 0.15 * torch.randn(batch, count, 2, generator=gen))
    boxes = torch.cat([c - s.abs() / 2, c + s.abs() / 2], dim=2)
    labels = torch.where(torch.rand(batch, count, generator=gen) < 0.8, which % classes,
                         torch.randint(0, classes, (batch, count), generator=gen))
    scores, order = torch.rand(batch, count, generator=gen).sort(dim=1, descending=True)
    return boxes.gather(1, order[..., None].expand(-1, -1, 4)), scores, labels.gather(1, order)


def greedy(boxes, scores, labels, iou=0.5, keep=100):
    rows = torch.zeros(len(boxes), keep, 6)
    rows[..., 5] = -1
    for i in range(len(boxes)):
        kept = batched_nms(boxes[i], scores[i], labels[i], iou)[:keep]
        rows[i, :len(kept)] = torch.cat([boxes[i, kept], scores[i, kept, None], labels[i, kept, None].float()], 1)
    return rows


def test_fast_nms_keeps_a_subset_of_greedy_nms_and_agrees_on_the_best():
    """Fast NMS keeps a candidate only when no better one of its class overlaps it, so everything it
    keeps greedy NMS keeps too (exactly). It also drops some that greedy keeps: those overlapped only
    by boxes that were themselves dropped, low in the ranking. Measured on these clustered cases
    (12 images, 300 candidates, 5 classes), as the share of greedy's detections that Fast NMS finds
    (class equal, IoU ≥ 0.99): 100 % of each image's best 5, 98.3 % of the best 10, 96.3 % of the
    best 20, 79.8 % of all (up to 100 per image)."""
    found = {10: [0, 0], 100: [0, 0]}
    for seed in range(3):
        boxes, scores, labels = candidates(seed)
        fast, slow = fast_nms(boxes, scores, labels).numpy(), greedy(boxes, scores, labels).numpy()
        matched, kept = match_rate(fast, slow)
        assert matched == kept > 0  # Fast NMS ⊆ greedy NMS
        for top, tally in found.items():
            best = slow.copy()
            best[:, top:, 4], best[:, top:, 5] = 0, -1
            m, t = match_rate(best, fast)
            tally[0], tally[1] = tally[0] + m, tally[1] + t
    assert found[10][0] / found[10][1] >= 0.95, found
    assert found[100][0] / found[100][1] >= 0.75, found


@pytest.mark.slow
def test_fcos_exports_to_onnx_with_a_dynamic_batch_and_onnxruntime_finds_the_same_detections(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("fcos-lite0", 3, 3, (SIZE, SIZE), outputs="boxes")
    head = model.net.model.head
    with torch.no_grad():  # spread the initial near-uniform scores, as training does: ties would reorder
        for layer in (head.classification_head.cls_logits, head.regression_head.bbox_ctrness):
            layer.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        head.regression_head.bbox_reg.bias.fill_(1.0)  # boxes of one anchor size, not the initial points
    model.eval()
    x, _ = tiny_batch()
    path = tmp_path / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["images"], output_names=["detections"],
                      dynamic_shapes=({0: batch},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randint(0, 255, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = model(images).numpy()
    exported = session.run(None, {"images": images.numpy()})[0]
    assert exported.shape == (3, 100, 6)
    matched, total = match_rate(eager, exported)
    assert total > 0 and matched == total, f"{matched} of {total} eager detections found in ONNX Runtime's"
    np.testing.assert_allclose(exported[:, 0, 4], eager[:, 0, 4], atol=1e-4)  # each image's best score


def spread(model) -> None:
    """Spread a fresh detector's near-uniform scores and point-sized boxes, as training does, so
    that rankings are not decided by float noise."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.net.model.head.named_parameters():
            if p.ndim == 4 and ("cls_logits" in name or "ctrness" in name or "bbox" in name):
                p.normal_(0, 0.05, generator=gen)
            elif "bbox_reg" in name and name.endswith("bias"):
                p.fill_(1.0)
            elif "cls_logits" in name and name.endswith("bias"):
                p.fill_(0.0)


@pytest.mark.parametrize("name", ["fcos-lite0", "retinanet-lite0"])
def test_decoding_matches_torchvisions_own_post_processing(name):
    """torchvision's own eval forward (per-level top 1000, greedy NMS), with our thresholds, is the
    reference for our decoding and scoring: greedy NMS over all our decoded candidates finds each of
    its 10 best detections per image exactly. The fixed-shape path (best 300 candidates, Fast NMS)
    finds 20 of 20 for both here (seed 0); an unseeded RetinaNet gave 18 of 20 (on a fresh,
    flat-scored model suppression reaches deep into the ranking): the test asks for 16."""
    torch.manual_seed(0)
    model = create_model(name, 3, 3, (SIZE, SIZE), outputs="boxes").eval()
    spread(model)
    tv, ours = model.net.model, model.net
    tv.score_thresh, tv.nms_thresh, tv.detections_per_img = 0.05, 0.5, 100
    x, _ = tiny_batch()
    with torch.no_grad():
        normalised = model.normalize(x)
        theirs = tv(list(normalised))
        fixed = model(x).numpy()
        features = list(tv.backbone(normalised).values())
        anchors = tv.anchor_generator(ImageList(normalised[:1], [(SIZE, SIZE)]), features)[0]
        everything = select_candidates(*ours.decode(tv.head(features), anchors), SIZE, SIZE, candidates=10 ** 6)
    reference = np.zeros((len(theirs), 10, 6), np.float32)
    reference[..., 5] = -1
    for i, found in enumerate(theirs):
        n = min(10, len(found["scores"]))
        reference[i, :n] = torch.cat([found["boxes"][:n], found["scores"][:n, None],
                                      found["labels"][:n, None].float()], 1).numpy()
    assert match_rate(reference, greedy(*everything).numpy()) == (20, 20)
    matched, total = match_rate(reference, fixed)
    assert total == 20 and matched >= 16, f"{matched} of torchvision's best {total} found"
