"""Exports of a segmentation model pass the parity check on masks (≥ 99.9% of pixels, logits within
tolerance), run in tiles like the eager model, and a file that gives other outputs is refused."""
import pytest
import torch

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.tiling import run_outputs
from cvrecipe.data import load_source
from cvrecipe.export import export_run
from cvrecipe.export.exporter import check, input_sample
from cvrecipe.export.onnx import OnnxRunner, write_onnx

from serve_helpers import one_torch_thread, train_shapes_run  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
              pytest.mark.slow]  # end to end: trains, exports and serves


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return train_shapes_run(tmp_path_factory.mktemp("segexport"))


@pytest.mark.parametrize("fmt, dynamic", [("onnx", True), ("onnx", False), ("torchscript", False)])
def test_exports_pass_parity_on_masks(shapes, fmt, dynamic):
    run_dir, _ = shapes
    result = export_run(run_dir, fmt, dynamic_batch=dynamic)
    report = result.parity
    assert report.passed and report.measure == "pixel agreement" and report.agreement >= 0.999
    manifest = result.manifest
    assert manifest["task"] == "segmentation" and manifest["tile"]["size"] == [32, 32]
    batch = 1 if fmt == "onnx" and not dynamic else "batch"  # a batch-1 export says so (set_shapes)
    assert manifest["files"][result.path.name]["output_shape"] == [batch, 3, "height", "width"]
    assert manifest["output"]["shape"][1:] == [3, "height", "width"]


def test_onnx_tiles_give_the_eager_masks_on_whole_images(shapes):
    run_dir, data = shapes
    result = export_run(run_dir, "onnx", dynamic_batch=True)
    model = load_model(run_dir)
    x = load_source(f"masks:{data}").train.x[:4]  # 48×48: each image is four overlapping 32×32 tiles
    runner = OnnxRunner(result.path)
    tiles = lambda t: torch.from_numpy(runner.predict(t.numpy()))  # noqa: E731
    exported = run_outputs(tiles, torch.from_numpy(x), model.meta)
    eager = predict_logits(model, x)
    assert exported.shape == eager.shape == (4, 3, 48, 48)
    torch.testing.assert_close(exported, eager, atol=1e-3, rtol=0)
    assert (exported.argmax(1) == eager.argmax(1)).float().mean() == 1.0


def test_an_export_of_other_weights_fails_the_mask_check(shapes, tmp_path):
    """The check has teeth: an ONNX file of changed weights (class 1 pushed up everywhere) is compared
    with the original eager model and fails on pixel agreement."""
    run_dir, data = shapes
    images = load_source(f"masks:{data}").train.x[:3]
    original, changed = load_model(run_dir), load_model(run_dir)
    with torch.no_grad():
        changed.net.head.bias[1] += 50
    path = tmp_path / "model.onnx"
    write_onnx(changed.eval(), input_sample(images, changed.meta), path, dynamic_batch=True)
    report = check(original, OnnxRunner(path), images, half=False)
    assert not report.passed and report.agreement < 0.999
    assert check(changed, OnnxRunner(path), images, half=False).passed  # against its own weights it matches
