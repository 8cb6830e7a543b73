"""`cvrecipe predict RUN clip.mp4`: an annotated video and per-frame JSON from a detector, on a clip the
test encodes itself with PyAV; bad videos refused in one line naming the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from cvrecipe.artifact.checkpoint import load_model, save_weights
from cvrecipe.cli import main
from cvrecipe.models import create_model
from cvrecipe.tasks import answers_of
from detector_helpers import confident_detector
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEIGHT, FRAMES, FPS = 160, 96, 20, 25


def write_clip(path: Path, frames: int = FRAMES) -> Path:
    """A bright block moving left to right over a dark noisy background, H.264 at FPS (the container
    from the file name's suffix)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            image = rng.integers(0, 60, (HEIGHT, WIDTH, 3)).astype(np.uint8)
            image[30:60, (6 * i) % WIDTH:(6 * i) % WIDTH + 30] = (240, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return confident_detector(tmp_path_factory.mktemp("run") / "best.safetensors")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


def test_video_predict_writes_per_frame_boxes_and_an_annotated_video(detector, clip, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(detector), str(clip), "--out", str(out), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["frames"] == FRAMES and summary["frames_per_s"] > 0 and summary["model_frames_per_s"] > 0
    assert summary["encoder"] in ("libx264", "mpeg4")
    record = json.loads((out / "clip.json").read_text())
    assert (record["width"], record["height"], record["fps"]) == (WIDTH, HEIGHT, FPS)
    frames = record["frames"]
    assert [f["frame"] for f in frames] == list(range(FRAMES))
    np.testing.assert_allclose([f["time"] for f in frames], np.arange(FRAMES) / FPS, atol=1e-6)

    # the reference: the eager model on the decoded frames resized to its input, boxes scaled to the frame
    model, source = load_model(detector), decoded(clip)
    from torchvision.transforms.v2.functional import resize
    x = resize(torch.from_numpy(source).permute(0, 3, 1, 2), list(model.meta["input_size"]), antialias=True)
    with torch.no_grad():
        rows = model(x).numpy()
    layer = answers_of("detection")
    expected = layer.answers(rows, model.meta, image_sizes=[(HEIGHT, WIDTH)] * FRAMES)
    for got, want in zip(frames, expected):
        assert len(got["boxes"]) == len(want["boxes"]) > 0
        for a, b in zip(got["boxes"], want["boxes"]):
            assert a["class"] == b["class"]
            np.testing.assert_allclose([a[c] for c in ("x1", "y1", "x2", "y2", "score")],
                                       [b[c] for c in ("x1", "y1", "x2", "y2", "score")], rtol=1e-4, atol=1e-3)

    annotated = decoded(out / "clip.annotated.mp4")  # decodes, every frame, at the frame's size
    assert annotated.shape == source.shape
    drawn = np.stack([layer.annotate(frame, f["boxes"], model.meta["class_names"]) for frame, f in zip(source, frames)])
    to_drawn = np.abs(annotated.astype(float) - drawn).mean()
    to_plain = np.abs(annotated.astype(float) - source).mean()
    assert to_drawn < 0.5 * to_plain, (to_drawn, to_plain)  # the boxes are in the video, not only the frames
    assert not list(out.glob(".*part*")), "the partial file is renamed when the video is whole"


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_a_video", "images_too"])
def test_a_bad_video_is_one_error_line_naming_it_and_writes_nothing(detector, clip, tmp_path, capsys, damage):
    bad = tmp_path / "bad.mp4"
    if damage == "truncated":
        data = clip.read_bytes()
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "not_a_video":
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    extra = [str(tmp_path / "frame.png")] if damage == "images_too" else []
    if damage == "images_too":
        bad = clip
    out = tmp_path / "out"
    code = main(["predict", str(detector), str(bad), *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error:") and (str(bad) if damage != "images_too" else "frame.png") in err, err
    assert not out.exists() or not list(out.iterdir())


def test_a_truncated_stream_answers_the_frames_it_holds_then_fails_naming_it(detector, tmp_path, capsys):
    whole = write_clip(tmp_path / "whole.mkv", frames=50)  # Matroska declares its duration up front
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    code = main(["predict", str(detector), str(cut), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(cut) in err and "truncated" in err, err
    frames = json.loads((out / "cut.json").read_text())["frames"]
    assert 0 < len(frames) < 50 and len(decoded(out / "cut.annotated.mp4")) == len(frames)


def test_video_predict_with_a_classifier_is_refused_in_one_line(clip, tmp_path, capsys):
    model = create_model("small-cnn", 2, 3, (16, 16), [0.0] * 3, [1.0] * 3, ["a", "b"])
    model.meta = {"task": "classification", **model.meta}
    save_weights(model, tmp_path / "best.safetensors")
    code = main(["predict", str(tmp_path / "best.safetensors"), str(clip), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(clip) in err and "detectors only" in err, err
    assert not (tmp_path / "out").exists()


def test_the_writer_encodes_what_the_reader_decodes(tmp_path):
    from cvrecipe.videofile import read_frames, write_video

    frames = [np.full((HEIGHT + 1, WIDTH + 1, 3), 16 * i, np.uint8) for i in range(6)]  # odd: cut to even
    encoder = write_video(tmp_path / "grey.mp4", frames, Fraction(10))
    info, batches = read_frames(tmp_path / "grey.mp4", batch=4)
    got = [b for b, _ in batches]
    assert (info.width, info.height, info.fps, encoder) == (WIDTH, HEIGHT, 10, encoder)
    assert [len(b) for b in got] == [4, 2]
    levels = np.concatenate(got).reshape(6, -1).mean(1)
    np.testing.assert_allclose(levels, [16 * i for i in range(6)], atol=2.5)  # lossy, but the levels survive


@pytest.mark.slow  # a fresh interpreter importing torch
def test_bench_video_prints_frames_per_second(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "bench" / "video.py"), "--frames", "6", "--size", "96x64",
                          "--input", "64", "--repeats", "1", "--confident", "--threads", "1"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frames/s end to end" in out.stdout and "model only" in out.stdout and "100.0 boxes per frame" in out.stdout


def _iou(a, b) -> float:
    w, h = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


@pytest.mark.slow  # trains a detector (8 images, 12 epochs at 64 px)
def test_a_trained_detector_finds_its_objects_in_a_wider_video_in_frame_pixels(tmp_path):
    """Trained on 8 images of digits (64 x 64), then run on a video of the same images stretched to
    160 x 96: its boxes must land on the true boxes scaled to the frame (x 2.5, y 1.5)."""
    from PIL import Image

    from cvrecipe.videofile import write_video
    from detector_helpers import digit_boxes_set

    data = digit_boxes_set(tmp_path / "set", {"train": (8, 1), "test": (8, 1)})
    assert main(["run", "detect-synth", f"data.name=boxes:{data}", "data.image_size=64",
                 f"data.cache_dir={tmp_path / 'cache'}", f"runs_dir={tmp_path / 'runs'}",
                 "model.kwargs={fpn_channels: 64}", "train.num_threads=1", "train.epochs=12", "train.batch_size=8", "data.val_fraction=0",
                 "augment.hflip=false", "optim.lr=3e-3", "train.sanity=false"]) == 0  # 8 images: too few for the checks
    coco = json.loads((data / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    frames, truth = [], []
    for image in coco["images"]:
        pixels = Image.open(data / "images" / "test" / Path(image["file_name"]).name).convert("RGB")
        frames.append(np.asarray(pixels.resize((WIDTH, HEIGHT), Image.BILINEAR)))
        truth.append([((x * 2.5, y * 1.5, (x + w) * 2.5, (y + h) * 1.5), names[a["category_id"]])
                      for a in coco["annotations"] if a["image_id"] == image["id"] for x, y, w, h in [a["bbox"]]])
    write_video(tmp_path / "digits.mp4", frames, Fraction(10))
    assert main(["predict", str(tmp_path / "runs" / "detect-synth"), str(tmp_path / "digits.mp4"),
                 "--out", str(tmp_path / "out")]) == 0
    answered = json.loads((tmp_path / "out" / "digits.json").read_text())["frames"]
    assert len(answered) == len(frames) == 8
    best = [max([_iou(box, (b["x1"], b["y1"], b["x2"], b["y2"])) for b in frame["boxes"] if b["class"] == name],
                default=0.0)
            for frame, boxes in zip(answered, truth) for box, name in boxes]
    found = np.mean(np.array(best) >= 0.5)
    print(f"{len(best)} true boxes: mean best IoU {np.mean(best):.3f}, found at IoU >= 0.5: {found:.2f}")
    assert found >= 0.6, best  # measured: 0.92 (11 of 12)
