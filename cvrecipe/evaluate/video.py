"""`cvrecipe predict RUN clip.mp4`: a model's answers on every frame of a video, drawn on the frames.

Frames are decoded (cvrecipe/videofile.py), resized to the model's input as `predict` resizes images (antialiased,
aspect not kept), run through the model in batches, answered in the frame's own pixels by the task's
answer layer, drawn on the full-size frame by the task and encoded again. Writes, beside each other,
OUT/<stem>.annotated.mp4 and OUT/<stem>.json ({"frames": [{"frame", "time", ...answer}]}); only a task
whose answers are drawn (boxes) predicts on video: the others are refused in one line before any work.
A file that decodes to fewer frames than it declares (truncated) has the frames it holds answered, and
then fails in one line naming it.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.config import load_run_config
from cvrecipe.data.images import to_channels
from cvrecipe.imagefile import MAX_PIXELS
from cvrecipe.tasks import get_task, task_of
from cvrecipe.videofile import VideoError, VideoWriter, read_frames

BATCH = 16  # frames per model call; 16 decoded 640x360 frames hold 11 MB


@dataclass
class VideoResult:
    file: str
    video: str  # the annotated video written
    answers: str  # the per-frame JSON written
    frames: int
    width: int
    height: int
    fps: float  # the input's declared frame rate
    encoder: str  # libx264 (H.264) or mpeg4
    seconds: float  # decode + model + draw + encode, wall clock
    model_seconds: float  # resize + model + answers only
    declared_frames: int  # the container's own count (0: it declares none)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else math.nan

    @property
    def model_frames_per_s(self) -> float:
        return self.frames / self.model_seconds if self.model_seconds else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "frames_per_s": self.frames_per_s, "model_frames_per_s": self.model_frames_per_s}

    def line(self) -> str:
        return (f"{self.file}: {self.frames} frames {self.width}x{self.height} → {self.video} ({self.encoder}), "
                f"{self.answers}; {self.frames_per_s:.1f} frames/s (decode + model + draw + encode), "
                f"{self.model_frames_per_s:.1f} frames/s model only")


def predict_video(run_dir: Path, path: Path, out_dir: Path | None = None, k: int | None = None,
                  batch: int = BATCH) -> VideoResult:
    """Answers for every frame of the video `path` with RUN's best checkpoint (see the module's doc)."""
    model = load_model(run_dir, "cpu")
    task = get_task(task_of(model.meta))
    if not task.DRAWS_ANSWERS:
        raise ValueError(f"{path}: video is predicted for detectors only: {task.NOT_DRAWN}")
    run_config = Path(run_dir) / "config.yaml"  # the run's own pixel limit, when it is a run folder
    max_pixels = load_run_config(run_dir).data.max_pixels if run_config.is_file() else MAX_PIXELS
    info, batches = read_frames(Path(path), batch, max_pixels)
    run_folder = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    out_dir = Path(out_dir) if out_dir else run_folder / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    video_out, json_out = out_dir / f"{Path(path).stem}.annotated.mp4", out_dir / f"{Path(path).stem}.json"
    partial = video_out.with_name(f".{video_out.name}.part{os.getpid()}.mp4")  # renamed when whole
    records, model_seconds, start = [], 0.0, time.perf_counter()
    try:
        with VideoWriter(partial, info.width, info.height, info.fps) as writer:
            for frames, times in batches:  # (B, H, W, 3) uint8, (B,) s
                tick = time.perf_counter()
                answers = task.answers(predict_logits(model, _model_input(frames, model.meta), batch), model.meta, k,
                                       image_sizes=[(info.height, info.width)] * len(frames))
                model_seconds += time.perf_counter() - tick
                for frame, t, answer in zip(frames, times, answers):
                    writer.write(task.draw_answer(answer, frame, model.meta))
                    records.append({"frame": len(records), "time": round(float(t), 6), **answer})
            if not records:
                raise VideoError(f"{path}: no frame could be decoded")
        os.replace(partial, video_out)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    result = VideoResult(str(path), str(video_out), str(json_out), len(records), info.width, info.height,
                         float(info.fps), writer.encoder, seconds, model_seconds, info.frames)
    json_out.write_text(json.dumps({"video": str(path), "width": info.width, "height": info.height,
                                    "fps": float(info.fps), "class_names": model.meta["class_names"],
                                    "frames": records}))
    short = info.shortfall(len(records), records[-1]["time"] if records else 0.0)
    if short:  # what was decoded is kept, and the command still fails: the file is not whole
        raise VideoError(f"{path}: truncated or damaged ({short}); the {len(records)} decoded frames are answered "
                         f"in {video_out} and {json_out}")
    return result


def _model_input(frames: np.ndarray, meta: dict) -> torch.Tensor:
    """(B, H, W, 3) uint8 frames → (B, C, h, w) uint8 at the model's input size, resized as predict
    resizes image files (torchvision's antialiased resize, the training decoder's)."""
    from torchvision.transforms.v2.functional import resize

    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    x = resize(x, list(meta["input_size"]), antialias=True)
    channels = meta["in_channels"]
    return x if channels == 3 else torch.stack([to_channels(image, channels) for image in x])
