"""Video files without torch, NumPy in and out, through PyAV (FFmpeg's libraries; the optional `video` extra).

Reading yields batches of frames as (B, H, W, 3) uint8 RGB with each frame's time in seconds;
writing encodes (H, W, 3) uint8 RGB frames as H.264 (libx264, yuv420p: what every player decodes),
or MPEG-4 Part 2 where this FFmpeg build has no H.264 encoder. Any failure to open or decode a file
(missing, not a video, truncated, a codec FFmpeg cannot decode) is one VideoError naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cvrecipe.imagefile import MAX_PIXELS

# what `cvrecipe predict` takes for a video (by name; the contents are checked when it is opened)
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
ENCODERS = ("libx264", "mpeg4")  # preferred first: H.264, else MPEG-4 Part 2 (FFmpeg's own, always built)
DEFAULT_FPS = Fraction(30)  # for a stream that declares no frame rate


class VideoError(ValueError):
    """A video file that cannot be read; the message names the file."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise RuntimeError("video needs PyAV: pip install 'cvrecipe[video]'") from None
    return av


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: Fraction  # frames per second as declared (average rate), DEFAULT_FPS when none is
    frames: int  # as declared by the container; 0 when unknown
    codec: str
    duration: float  # s, as declared by the stream or the container; 0 when unknown

    def shortfall(self, frames: int, last_time: float) -> str | None:
        """Why a stream that decoded `frames` frames, the last at `last_time` s, is shorter than it
        declares (a truncated or damaged file), or None. A frame's worth of slack either way: containers
        round their durations."""
        if self.frames and frames < self.frames:
            return f"{frames} frames decoded of the {self.frames} it declares"
        period = 1 / float(self.fps)
        if self.duration and self.duration - (last_time + period) > 2 * period:
            return f"{last_time + period:.2f} s decoded of the {self.duration:.2f} s it declares"
        return None


def read_frames(path: Path, batch: int = 16, max_pixels: int = MAX_PIXELS
                ) -> tuple[VideoInfo, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """The first video stream of `path`: its VideoInfo, and an iterator over batches of at most
    `batch` frames ((B, H, W, 3) uint8 RGB, (B,) float64 times in seconds from the stream's start).
    Opening checks the file (VideoError); a decoding failure later raises VideoError from the iterator."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise VideoError(f"{path}: not a readable video ({_reason(err)})") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream in the file")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or not ctx.width or not ctx.height:
        container.close()
        raise VideoError(f"{path}: the video stream's codec ({stream.codec.name if stream.codec else '?'}) "
                         f"cannot be decoded here")
    if ctx.width * ctx.height > max_pixels:
        container.close()
        raise VideoError(f"{path}: frames of {ctx.width}x{ctx.height} pixels, above data.max_pixels={max_pixels:,}")
    stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
    fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
    # s: the stream's own duration, else the container's (Matroska declares only the latter)
    duration = (float(stream.duration * stream.time_base) if stream.duration
                else (container.duration or 0) / av.time_base)
    info = VideoInfo(ctx.width, ctx.height, Fraction(fps), int(stream.frames or 0), ctx.name, duration)
    return info, _batches(av, container, stream, path, batch, info.fps)


def _batches(av, container, stream, path: Path, batch: int, fps: Fraction) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    frames, times = [], []
    try:
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
            # frame.time: the presentation time in s; absent in some raw streams, then counted at the declared rate
            times.append(frame.time if frame.time is not None else len(times) / float(fps))
            if len(frames) == batch:
                yield np.stack(frames), np.asarray(times, np.float64)
                frames, times = [], []
        if frames:
            yield np.stack(frames), np.asarray(times, np.float64)
    except av.error.FFmpegError as err:
        raise VideoError(f"{path}: decoding failed ({_reason(err)})") from err
    finally:
        container.close()


def _reason(err: Exception) -> str:
    return (getattr(err, "strerror", None) or str(err)).strip()


class VideoWriter:
    """Encodes (H, W, 3) uint8 RGB frames into `path` at `fps`. H.264 and MPEG-4 take even sizes only
    (4:2:0 chroma): an odd width or height loses its last column or row. Use as a context manager;
    `encoder` names the encoder used."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction):
        av = _av()
        self.path = Path(path)
        self.width, self.height = width - width % 2, height - height % 2
        self.container = av.open(str(self.path), mode="w")
        self.encoder = next(name for name in ENCODERS if name in av.codecs_available)
        # ultrafast: ~3 ms per 640x360 frame on 2 busy cores where veryfast took ~21 ms (files ~40 % larger);
        # crf 23: x264's default quality
        options = {"preset": "ultrafast", "crf": "23"} if self.encoder == "libx264" else {}
        self.stream = self.container.add_stream(self.encoder, rate=fps, options=options)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.time_base = 1 / Fraction(fps)
        self.stream.codec_context.time_base = self.time_base
        self.frames = 0
        self._av = av

    def write(self, image: np.ndarray) -> None:
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:self.height, :self.width]), format="rgb24")
        frame.pts = self.frames  # in 1/fps units: frames follow each other at the declared rate
        frame.time_base = self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder's delayed frames
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.container.close()


def write_video(path: Path, frames: Iterable[np.ndarray], fps: Fraction | int = 30) -> str:
    """Encode `frames` ((H, W, 3) uint8 each, read one at a time) into `path`; returns the encoder's name."""
    frames = iter(frames)
    first = next(frames)
    with VideoWriter(path, first.shape[1], first.shape[0], Fraction(fps)) as writer:
        writer.write(first)
        for frame in frames:
            writer.write(frame)
    return writer.encoder
