"""Frames per second of `cvrecipe predict RUN clip.mp4` (a detector on every frame of a video).

Writes a synthetic clip (coloured blocks moving over a noisy gradient, H.264 through PyAV) of
--frames frames at --size, then runs cvrecipe.evaluate.video.predict_video on it --repeats times and
prints, per run, frames/s end to end (decode + resize + model + answers + draw + encode), frames/s of
the model alone (resize + model + answers) and the process's CPU time per frame (all its threads). Without --run the detector is --model built at --input px
with untrained heads (ImageNet backbone where the model has one); --confident biases its class
logits up so every frame carries the full 100 boxes to draw (the worst case for drawing), else
hardly any box passes the answers' 0.25 score floor (the speed of the model alone).

    python bench/video.py                                  # fcos-lite0 at 128 px, 640x360, 150 frames
    python bench/video.py --run runs/detect-synth          # a trained detector
    python bench/video.py --frames 8 --size 96x64 --input 64 --repeats 1   # a quick check
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_clip(path: Path, frames: int, width: int, height: int, fps: int, seed: int = 0) -> Path:
    """Three blocks crossing a noisy gradient at different speeds."""
    from cvrecipe.videofile import write_video

    rng = np.random.default_rng(seed)
    gradient = np.linspace(40, 160, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    side = max(8, height // 6)
    blocks = [((230, 60, 60), 0.2, 2), ((60, 220, 90), 0.5, 3), ((70, 110, 240), 0.75, 5)]  # colour, row, px/frame

    def frame(i: int) -> np.ndarray:
        image = gradient + rng.normal(0, 12, (height, width, 3))
        for colour, row, speed in blocks:
            x, y = (speed * i) % max(1, width - side), int(row * (height - side))
            image[y:y + side, x:x + side] = colour
        return np.clip(image, 0, 255).astype(np.uint8)

    write_video(path, (frame(i) for i in range(frames)), Fraction(fps))
    return path


def untrained_detector(path: Path, model: str, size: int, confident: bool) -> Path:
    import torch

    from cvrecipe.artifact.checkpoint import save_weights
    from cvrecipe.models import create_model

    torch.manual_seed(0)
    net = create_model(model, 10, 3, (size, size), [127.0] * 3, [64.0] * 3, [f"class{i}" for i in range(10)],
                       outputs="boxes")
    if confident:
        with torch.no_grad():
            net.net.model.head.classification_head.cls_logits.bias.fill_(4.0)
    net.meta = {"task": "detection", **net.meta}
    save_weights(net, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run folder or checkpoint (default: an untrained --model)")
    p.add_argument("--model", default="fcos-lite0")
    p.add_argument("--input", type=int, default=128, help="the untrained model's input size, px")
    p.add_argument("--confident", action="store_true", help="untrained model: 100 boxes on every frame")
    p.add_argument("--size", default="640x360", help="the clip's WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="frames per model call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = p.parse_args()

    import torch

    from cvrecipe.evaluate.video import predict_video

    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = map(int, args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = synthetic_clip(tmp / "clip.mp4", args.frames, width, height, args.fps)
        run = args.run or untrained_detector(tmp / "best.safetensors", args.model, args.input, args.confident)
        print(f"clip: {args.frames} frames {width}x{height} at {args.fps} fps; model: "
              f"{args.run or f'{args.model} at {args.input} px, untrained heads'}; batch {args.batch}; "
              f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}")
        for i in range(args.repeats):
            cpu = time.process_time()  # CPU s of every thread of this process: what load on the machine hides least
            result = predict_video(run, clip, tmp / "out", batch=args.batch)
            cpu = time.process_time() - cpu
            boxes = np.mean([len(f["boxes"]) for f in _frames(result.answers)])
            print(f"run {i}: {result.frames_per_s:.1f} frames/s end to end, {result.model_frames_per_s:.1f} frames/s "
                  f"model only, {1000 * cpu / result.frames:.1f} CPU ms per frame, {boxes:.1f} boxes per frame, "
                  f"encoder {result.encoder}, load {os.getloadavg()[0]:.2f}")


def _frames(path: str) -> list[dict]:
    import json

    return json.loads(Path(path).read_text())["frames"]


if __name__ == "__main__":
    main()
