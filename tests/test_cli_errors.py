"""The command line's error boundary, through real `cvrecipe` processes: every failure is one line
naming the file, key or limit, with exit status 2 for bad input and 1 for a failed run, and no
traceback unless --debug (or CVRECIPE_DEBUG=1) asks for it. Tampered run folders (a pickle that
would run code, garbage weights, a YAML tag) are refused without running anything and without
suggesting weights_only=False; a decompression bomb given to `predict` is refused unread."""
import os
import pickle
import resource
import shutil
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.train.job import train

from conftest import make_image_folder
from image_files import encode, jpeg_declaring

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

ROOT = Path(__file__).resolve().parents[1]


def cvrecipe(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvrecipe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The run's only `error:` line, on stderr, after checking that nothing printed a traceback."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "weights_only" not in text, text
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "error:" not in out.stdout, text
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = load_config("digits-quick", [f"runs_dir={root}", "train.epochs=1", "train.sanity=false", "name=good"])
    return train(cfg, console=Console(quiet=True))


def tampered(run_dir: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    (copy / name).write_bytes(data)
    return copy


class RunsCode:
    """Unpickling this calls os.system: what a malicious last.ckpt holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(run_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tampered(run_dir, tmp_path, "last.ckpt", pickle.dumps({"model": RunsCode(marker)}, protocol=2))
    refusal = f"error: {evil / 'last.ckpt'}: not a cvrecipe checkpoint (refused: loading it would run code)"
    out = cvrecipe("train", "--resume", evil, cwd=tmp_path)
    assert out.returncode == 2 and one_error_line(out) == refusal
    assert not marker.exists() and "run folder" not in out.stdout  # refused before any data was read
    # the newest pickle protocol too (torch's loader fails on another opcode there), in this process
    (evil / "last.ckpt").write_bytes(pickle.dumps({"model": RunsCode(marker)}, protocol=pickle.HIGHEST_PROTOCOL))
    assert main(["train", "--resume", str(evil)]) == 2
    printed = capsys.readouterr()
    assert printed.err.strip() == refusal and "weights_only" not in printed.out + printed.err
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["eval", "predict", "export"])
def test_garbage_weights_are_one_line_naming_the_file(run_dir, tmp_path, verb):
    bad = tampered(run_dir, tmp_path, "best.safetensors", b"\xff" * 64)
    image = tmp_path / "x.png"
    image.write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))  # a good image: the model must be loaded
    out = cvrecipe(verb, bad, *([image] if verb == "predict" else []), cwd=tmp_path)
    assert out.returncode == 2
    line = one_error_line(out)
    assert f"{bad / 'best.safetensors'}: not a cvrecipe checkpoint (unreadable safetensors" in line


def test_a_yaml_tag_in_a_run_config_is_refused_not_constructed(run_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tampered(run_dir, tmp_path, "config.yaml", f"!!python/object/apply:os.system ['touch {marker}']\n".encode())
    refusal = (f"error: {bad / 'config.yaml'}: not a cvrecipe config (refused: could not determine a constructor for "
               f"the tag 'tag:yaml.org,2002:python/object/apply:os.system', line 1; configs are plain YAML with no tags)")
    out = cvrecipe("eval", bad, cwd=tmp_path)
    assert out.returncode == 2 and one_error_line(out) == refusal
    assert main(["train", "--resume", str(bad)]) == 2 and capsys.readouterr().err.strip() == refusal
    assert not marker.exists()


@pytest.mark.parametrize("override", ["optim.lr=-1", "optim.name=foo", "schedule.name=foo", "train.schedule=foo",
                                      "train.batch_size=0", "train.epochs=0"])
def test_bad_values_are_one_line_and_leave_no_run_folder(tmp_path, override):
    out = cvrecipe("train", "digits-quick", override, f"runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2 and override.split("=")[0] in one_error_line(out)
    assert not (tmp_path / "runs").exists()


def test_a_failed_run_exits_1_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    args = ["train", "digits-quick", "model.kwargs={nope: 1}", f"runs_dir={tmp_path / 'runs'}", "--no-sanity"]
    out = cvrecipe(*args, cwd=tmp_path)
    line = one_error_line(out)
    assert out.returncode == 1 and line.startswith("error: TypeError:") and "'nope'" in line and "--debug" in line
    assert not any((tmp_path / "runs").glob("*/config.yaml"))  # the folder of the failed start was removed
    assert main([*args, "--debug"]) == 1  # anywhere on the line
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("CVRECIPE_DEBUG", "1")
    assert main(args) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_predict_refuses_a_jpeg_bomb_unread_with_the_memory_of_an_ordinary_image(run_dir, tmp_path):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_declaring(30_000, 30_000))  # 629 bytes declaring 900 Mpx (2.7 GB decoded)
    good = tmp_path / "good.png"
    good.write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    peaks = {}
    for image in (good, bomb):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = cvrecipe("predict", run_dir, image, cwd=tmp_path)
        peaks[image.name] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before
        assert out.returncode == (2 if image == bomb else 0), out.stdout + out.stderr  # 2: every file refused
    assert "bomb.jpg: unreadable (declares 30000x30000 = 900,000,000 pixels, above the limit of 40,000,000" in out.stdout
    # ru_maxrss of children is the largest child so far: the bomb's run must not raise it much
    assert peaks["bomb.jpg"][0] - peaks["good.png"][0] < 100 * 1024, peaks


def test_a_command_warns_about_skipped_files_once_in_one_line_with_the_full_list_in_a_file(tmp_path, capsys):
    """`run` loads its data three times (train, evaluate, report); the warning about the bad files is
    one plain line on stderr, given once, naming the file that lists them all (no Python source line,
    no list cut short)."""
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 12, "test": 4}, size=8)
    broken = sorted(f"train/cat/broken{i}.jpg" for i in range(7))
    for name in broken:
        (data / name).write_bytes(b"\xff\xd8\xff not really")
    assert main(["run", "digits-quick", f"data.name=folder:{data}", f"runs_dir={tmp_path / 'runs'}", "--no-sanity",
                 "train.epochs=1", "data.val_fraction=0.2"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {data}: skipped 7 unreadable file(s) (e.g. "), err
    assert "warnings.warn" not in err and "UserWarning" not in err and "more" not in lines[0]
    listing = Path(lines[0].rsplit("all listed in ", 1)[1])
    assert listing.name == "skipped_files.txt" and [row.split("\t")[0] for row in listing.read_text().splitlines()] == broken
    in_run = (tmp_path / "runs" / "digits-quick" / "skipped_files.txt").read_text()
    assert in_run == listing.read_text()  # the run keeps its own copy


def test_a_last_ckpt_of_random_bytes_is_said_to_be_no_checkpoint(run_dir, tmp_path, capsys):
    import random

    bad = tampered(run_dir, tmp_path, "last.ckpt", random.Random(0).randbytes(4096))
    assert main(["train", "--resume", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad / 'last.ckpt'}: not a cvrecipe checkpoint (unreadable: "
                                               f"neither a file torch.save writes nor any pickle)")


def test_predict_answers_files_refused_by_their_headers_without_loading_torch(run_dir, tmp_path):
    """Every file refused from its header alone: the answer needs no model, so torch is never imported
    (the command ends in about the interpreter's start-up time). With one good file, the model runs."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_declaring(30_000, 30_000))
    text = tmp_path / "notes.png"
    text.write_bytes(b"not an image at all")
    probe = ("import sys; from cvrecipe.cli import main; code = main(sys.argv[1:]); "
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", probe, "predict", str(run_dir), str(bomb), str(text)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr  # every file given was refused
    assert "bomb.jpg: unreadable (declares 30000x30000 = 900,000,000 pixels, above the limit of 40,000,000" in out.stdout
    assert "notes.png: unreadable (not a recognised image format" in out.stdout
    assert out.stdout.rstrip().endswith("torch not imported")
    good = tmp_path / "good.png"
    good.write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    out = subprocess.run([sys.executable, "-c", probe, "predict", str(run_dir), str(bomb), str(good), "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    answers = {Path(r["file"]).name: r for r in json.loads(out.stdout[:out.stdout.rindex("]") + 1])}
    assert "error" in answers["bomb.jpg"] and "error" not in answers["good.png"] and out.returncode == 0
    assert out.stdout.rstrip().endswith("torch imported")


@pytest.mark.parametrize("k", ["0", "-1"])
def test_predict_refuses_a_top_k_below_1_before_loading_anything(run_dir, tmp_path, k):
    image = tmp_path / "x.png"
    image.write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    out = cvrecipe("predict", run_dir, image, "-k", k, cwd=tmp_path)
    assert out.returncode == 2 and one_error_line(out) == f"error: -k/--top-k {k}: expected 1 or more classes (or boxes) per image"
    assert out.stdout == ""


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range_before_loading_the_model(run_dir, tmp_path, port):
    out = cvrecipe("serve", run_dir, "--port", port, cwd=tmp_path)
    assert out.returncode == 2
    assert one_error_line(out) == f"error: --port {port}: expected a TCP port from 0 to 65535 (0: any free port)"


def test_serve_refuses_a_busy_port_before_loading_the_model(run_dir, tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = cvrecipe("serve", run_dir, "--port", port, "--backend", "torch", cwd=tmp_path)
    assert out.returncode == 2
    # the only line: no log of a model loaded or of a server started
    assert out.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: in use by another process "
                                       f"(--host/--port)"], out.stderr
