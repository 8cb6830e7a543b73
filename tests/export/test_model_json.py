"""model.json describes each exported file's shapes as they are: a batch-1 export says [1, K], a
folder holding a fixed-batch and an any-batch file says so per file; the grayscale rule the model's
inputs were made with is recorded."""
import json

import numpy as np
import pytest
import torch

from cvrecipe.data.images import GRAYSCALE_RULE
from cvrecipe.export import export_model
from cvrecipe.models import create_model

from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]


@pytest.mark.slow
def test_shapes_per_file_and_the_batch_dimension_of_a_batch_1_export(tmp_path):
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=4, in_channels=1, input_size=(12, 12), class_names=list("abcd"),
                         width=8).eval()
    images = np.random.default_rng(0).integers(0, 256, (16, 1, 12, 12), dtype=np.uint8)
    export_model(model, images, tmp_path / "export", "onnx", dynamic_batch=False)
    manifest = json.loads((tmp_path / "export" / "model.json").read_text())
    assert manifest["output"]["shape"] == [1, 4]
    assert manifest["files"]["model.onnx"]["input_shape"] == [1, 1, 12, 12]
    assert manifest["files"]["model.onnx"]["output_shape"] == [1, 4]
    assert manifest["preprocessing"]["grayscale"] == GRAYSCALE_RULE

    export_model(model, images, tmp_path / "export", "torchscript")  # any batch size, beside the batch-1 file
    manifest = json.loads((tmp_path / "export" / "model.json").read_text())
    assert manifest["output"]["shape"] == ["batch", 4]
    assert manifest["files"]["model.pt"]["output_shape"] == ["batch", 4]
    assert manifest["files"]["model.onnx"]["output_shape"] == [1, 4]
