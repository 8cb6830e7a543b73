"""Export: every registered model, both formats, checked against the eager model; files that run
without cvrecipe; the CLI on a real run; failed checks leave nothing behind."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.data.images import decode_images
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.export import ExportError, export_model
from cvrecipe.export.manifest import sha256_file
from cvrecipe.export.onnx import OnnxRunner
from cvrecipe.models import create_model, list_models
from cvrecipe.train.job import train

from conftest import encode, pattern_image
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32  # an input size every registered model takes (seed-cnn's three valid convs need 32)


def real_images(n: int, channels: int = 3, size: int = SIZE, fmt: str = "PNG") -> tuple[np.ndarray, list[bytes]]:
    """(uint8 (n, C, H, W) from the training decoder, encoded files): what a user would send."""
    rng = np.random.default_rng(1)
    files = [encode(pattern_image(i % 3, size, rng, channels), fmt) for i in range(n)]
    x, good, skipped = decode_images([(str(i), f) for i, f in enumerate(files)], channels, size)
    assert not skipped and len(good) == n
    return x, files


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=5, in_channels=3, input_size=(SIZE, SIZE), mean=[0.45, 0.5, 0.55],
                        std=[0.2, 0.25, 0.3], class_names=list("abcde")).eval()


def eager(model, x: np.ndarray) -> np.ndarray:
    return predict_logits(model, x, device=torch.device("cpu")).numpy()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_and_matches_eager(tmp_path, name, fmt):
    model = make_model(name)
    x, _ = real_images(12)
    result = export_model(model, x, tmp_path / "export", fmt, dynamic_batch=True)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4 and result.parity.agreement == 1.0
    manifest = json.loads((tmp_path / "export" / "model.json").read_text())
    entry = manifest["files"][result.path.name]
    assert entry["sha256"] == sha256_file(result.path) and entry["format"] == fmt and entry["precision"] == "fp32"
    pre = manifest["preprocessing"]
    assert (pre["input_dtype"], pre["channels"], pre["input_size"]) == ("uint8", 3, [SIZE, SIZE])
    assert pre["mean"] == [0.45, 0.5, 0.55] and manifest["class_names"] == list("abcde")

    # load with the runtime alone (not cvrecipe's runners) at a batch size the check did not use
    batch = np.concatenate([x, x[:5]])  # 17 images
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": batch})[0]
    else:
        with torch.inference_mode():
            got = torch.jit.load(str(result.path)).eval()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, eager(model, batch), atol=1e-4, rtol=0)


# Runs in a fresh interpreter with the repository off sys.path and any import of cvrecipe
# refused: the export folder plus onnxruntime/torch/PIL must be enough.
STANDALONE = r"""
import importlib.abc, json, sys
from pathlib import Path

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cvrecipe":
            raise ImportError("cvrecipe is not available here")

sys.meta_path.insert(0, Refuse())
repo = Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if p and Path(p).resolve() not in (repo, repo / "tests")]

import numpy as np, onnxruntime, torch
from PIL import Image

export, files = Path(sys.argv[2]), sys.argv[3:]
meta = json.loads((export / "model.json").read_text())
pre = meta["preprocessing"]
h, w = pre["input_size"]
mode = {"RGB": "RGB", "L": "L"}[pre["channel_order"]]
arrays = []
for f in files:
    img = Image.open(f).convert(mode)
    assert img.size == (w, h), img.size  # same size as the model input: no resize needed here
    a = np.asarray(img, dtype=np.uint8)
    arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
x = np.stack(arrays)  # (N, C, H, W) uint8, as model.json says
onnx_logits = onnxruntime.InferenceSession(str(export / "model.onnx")).run(None, {pre["input_name"]: x})[0]
with torch.inference_mode():
    ts_logits = torch.jit.load(str(export / "model.pt"))(torch.from_numpy(x)).numpy()
try:
    import cvrecipe
    leaked = True
except ImportError:
    leaked = False
print(json.dumps({"onnx": onnx_logits.tolist(), "torchscript": ts_logits.tolist(), "classes": meta["class_names"],
                  "cvrecipe_importable": leaked}))
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exports_run_without_cvrecipe(tmp_path):
    model = make_model("small-cnn", seed=3)
    x, files = real_images(6)
    export_dir = tmp_path / "export"
    export_model(model, x, export_dir, "onnx", dynamic_batch=True)
    export_model(model, x, export_dir, "torchscript")
    assert set(json.loads((export_dir / "model.json").read_text())["files"]) == {"model.onnx", "model.pt"}
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    out = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(ROOT), str(export_dir), *map(str, paths)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cvrecipe_importable"] is False
    expected = eager(model, x)
    np.testing.assert_allclose(np.array(result["onnx"]), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(result["torchscript"]), expected, atol=1e-4, rtol=0)
    assert result["classes"] == list("abcde")


@pytest.mark.slow
def test_cli_export_of_a_run_checks_on_its_own_test_images(tmp_path, capsys):
    run_dir = train(load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=1", "train.sanity=false"]))
    assert main(["export", str(run_dir)]) == 0  # defaults: ONNX, batch fixed at 1
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    manifest = json.loads((run_dir / "export" / "model.json").read_text())
    assert manifest["source"]["run"] == str(run_dir)
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(run_dir / "best.safetensors")
    onnx_entry = manifest["files"]["model.onnx"]
    n = onnx_entry["parity"]["images"]  # digits' whole test split (a fifth of 1,797 images)
    assert 300 < n <= 1000 and manifest["source"]["check_images"] == f"digits test, first {n}"
    assert onnx_entry["batch_size"] == 1
    assert onnx_entry["parity"]["max_abs_diff"] <= 1e-4 and onnx_entry["parity"]["agreement"] == 1.0
    assert manifest["files"]["model.pt"]["parity"]["passed"]
    # a fixed-batch file still answers any number of images, one slice at a time
    runner = OnnxRunner(run_dir / "export" / "model.onnx")
    assert runner.fixed_batch == 1 and runner.predict(np.zeros((3, 1, 8, 8), np.uint8)).shape == (3, 10)

    assert main(["export", str(run_dir), "--dynamic-batch", "--half"]) == 0
    entry = json.loads((run_dir / "export" / "model.json").read_text())["files"]["model.onnx"]
    assert entry["precision"] == "fp16" and entry["batch_size"] is None
    assert entry["parity"]["atol"] > 1e-4 and entry["parity"]["min_agreement"] == 0.99 and entry["parity"]["passed"]


@pytest.mark.slow
def test_failed_check_reports_figures_and_changes_nothing(tmp_path):
    model = make_model("small-cnn")
    x, _ = real_images(8)
    export_dir = tmp_path / "export"
    export_model(model, x, export_dir, "onnx", dynamic_batch=True)
    before = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    # fp16 weights cannot meet a 1e-9 tolerance: the check must refuse the file
    with pytest.raises(ExportError, match=r"max \|logit diff\| .* \(limit 1e-09\).*nothing was written"):
        export_model(model, x, export_dir, "onnx", dynamic_batch=True, half=True, atol=1e-9)
    assert {p.name: p.read_bytes() for p in export_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left over


@pytest.mark.slow
def test_export_of_other_weights_replaces_stale_files(tmp_path):
    x, _ = real_images(4)
    export_dir = tmp_path / "export"
    export_model(make_model("small-cnn", seed=1), x, export_dir, "torchscript")
    export_model(make_model("small-cnn", seed=2), x, export_dir, "onnx")
    assert sorted(p.name for p in export_dir.iterdir()) == ["model.json", "model.onnx"]
    assert list(json.loads((export_dir / "model.json").read_text())["files"]) == ["model.onnx"]


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_model(make_model("small-cnn"), real_images(2)[0], tmp_path / "e", "tflite")
