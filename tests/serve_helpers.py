"""Helpers for export and server tests: a trained run on learnable images, uvicorn on a real
socket, a held-back upload, and a one-thread torch fixture."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from rich.console import Console

from cvrecipe.config import load_config
from cvrecipe.train.job import train
from cvrecipe.serve import ServeSettings, create_app

from conftest import make_image_folder

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Module fixture: torch on one thread while the module runs, then as before. These tiny
    models gain nothing from intra-op threads, and on a busy 2-core machine the threads' barriers
    stall for milliseconds per op (a 1-epoch digits run took 11 s instead of 0.2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_stripes_run(root: Path) -> tuple[Path, Path]:
    """(run folder, image folder): a small CNN trained for seconds on 16×16 striped images of 3 classes."""
    data = make_image_folder(root / "images", classes=CLASSES, per_class={"train": 40, "test": 12})
    cfg = load_config("digits-quick", [f"data.name=folder:{data}", f"runs_dir={root / 'runs'}", "name=stripes",
                                       "train.epochs=6", "train.sanity=false", "model.kwargs={width: 8}",
                                       f"data.cache_dir={root / 'cache'}"])
    return train(cfg, console=Console(quiet=True)), data


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def loopback_socket() -> socket.socket:
    """A listening-ready socket on 127.0.0.1 with a free port chosen by the OS (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(source: Path, wait_ready: bool = True, **settings):
    """Run the real app on uvicorn in a thread; yields (base URL, app). Stops it on exit."""
    sock = loopback_socket()
    app = create_app(ServeSettings(source, **settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        path = "/readyz" if wait_ready else "/healthz"
        wait_until(lambda: httpx.get(url + path, timeout=2).status_code == 200, 30, f"{path} at {url}")
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


def metric_samples(url: str, name: str) -> list:
    """Samples of one metric family from /metrics, parsed with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(name)]


class SlowUpload:
    """A predict request whose body stops after its first bytes until `release()`: it stays in
    flight, counted as still arriving, so the batcher waits (up to max wait) for it to join."""

    def __init__(self, url: str, data: bytes, hold_s: float = 30):
        self.release_event = threading.Event()
        self.response: httpx.Response | None = None

        def body():
            yield data[:8]
            self.release_event.wait(hold_s)  # bounded: the upload resumes by itself after hold_s
            yield data[8:]

        def send():
            self.response = httpx.post(url + "/v1/predict", content=body(), timeout=hold_s + 30,
                                       headers={"content-type": "image/jpeg"})

        self.thread = threading.Thread(target=send, daemon=True)
        self.thread.start()
        wait_until(lambda: metric_samples(url, "cvrecipe_in_flight_requests")[0].value >= 2, 10,
                   "the slow upload to start")  # itself plus the /metrics request

    def release(self) -> httpx.Response:
        self.release_event.set()
        self.thread.join(timeout=30)
        return self.response


def train_shapes_run(root: Path, overrides=()) -> tuple[Path, Path]:
    """(run folder, data folder): a small U-Net trained for seconds on 48×48 synthetic shapes (discs,
    squares, background) from 32×32 crops, so evaluation, export and serving run it in tiles."""
    from conftest import make_shapes_masks

    data = make_shapes_masks(root / "shapes", count=30, size=48)
    cfg = load_config(None, ["task=segmentation", f"data.name=masks:{data}", "data.val_fraction=0.2",
                             f"runs_dir={root / 'runs'}", "name=shapes", f"data.cache_dir={root / 'cache'}",
                             "model.name=unet", "model.kwargs={depth: 2, width: 8}", "augment.crop_size=32",
                             "augment.hflip=true", "augment.rot90=true", "train.epochs=6", "train.repeat=4",
                             "train.batch_size=8", "optim.name=adam", "optim.lr=0.01", "optim.weight_decay=0",
                             "segment.loss=ce+dice", "segment.tile_overlap=0.5", "train.sanity=false",
                             "checkpoint.monitor=val_dice", "train.log_every=1", *overrides])
    return train(cfg, console=Console(quiet=True)), data
