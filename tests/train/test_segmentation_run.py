"""A short segmentation run through the unchanged training loop learns: synthetic shapes (discs,
squares, background) from 32×32 crops, evaluated on whole 48×48 images in tiles, far above chance;
the sanity checks work per pixel and per image."""
import math

import pytest
import torch
from rich.console import Console

from cvrecipe.config import load_run_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.job import evaluate_run
from cvrecipe.tasks.segmentation import segmentation_metrics
from cvrecipe.train.sanity import run_checks

from serve_helpers import one_torch_thread, train_shapes_run  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: trains segmentation models


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return train_shapes_run(tmp_path_factory.mktemp("seg"))


def test_a_short_run_learns_far_above_chance(shapes):
    run_dir, _ = shapes
    result, logits = evaluate_run(run_dir, console=Console(quiet=True))
    cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    split, part = ds.eval_split
    assert logits.shape == (len(part), 3, 48, 48)  # whole images, though the model was trained on 32×32 crops
    # chance: always the commonest class (the background), scored by the same code
    constant = torch.zeros_like(logits)
    constant[:, 0] = 1
    chance = segmentation_metrics(constant, torch.from_numpy(part.y), ds.classes)
    assert result["mean_dice"] > 0.85 and result["mean_dice"] > chance["mean_dice"] + 0.4, (result, chance)
    assert all(c["dice"] > 0.7 for c in result["per_class"])
    history = (run_dir / "metrics.csv").read_text().splitlines()
    assert history[0].split(",")[3:11] == ["train_loss", "train_pixel_acc", "train_miou", "train_dice", "val_loss",
                                           "val_pixel_acc", "val_miou", "val_dice"]
    assert len(history) == 1 + 6


def test_sanity_checks_work_per_pixel(shapes):
    run_dir, _ = shapes
    cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    results = {r.name: r for r in run_checks(cfg, ds)}
    assert all(r.status != "fail" for r in results.values()), {k: r.message for k, r in results.items()}
    init = results["init-loss"].values
    assert init["deviation"] < 0.15  # the loss of uniform outputs: ln 3 + the soft Dice of a uniform softmax
    assert init["expected"] > math.log(3)
    assert results["overfit"].values["accuracy"] >= 0.9  # share of the batch's pixels right
    # masks shuffled against their images cannot be learned: no better than the commonest class's pixel share
    leak = results["label-leak"]
    assert leak.status == "pass" and leak.values["accuracy"] < leak.values["chance"] + 0.05
    zero = results["zero-input"]
    assert zero.status == "pass" and zero.values["real_loss"] < zero.values["zero_loss"]


def test_a_pipeline_that_paints_the_mask_into_the_image_is_caught(shapes):
    """label-leak: a pipeline bug that writes the mask into the image's first channel lets shuffled
    masks be 'learned' on held-out crops; the check fails it."""
    run_dir, _ = shapes
    cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)

    def leaky(x, y, gen):
        x = x.clone()
        x[:, 0] = (y.long() * 100).clamp(max=255).to(torch.uint8)
        return x, y

    result = {r.name: r for r in run_checks(cfg, ds, make_inputs=leaky)}["label-leak"]
    assert result.status == "fail", result.message
