"""Run `cvrecipe tune` as a user does (a real process, real worker processes) and read its study."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tune_command(space: Path, *args: str, recipe: str = "digits-quick") -> list[str]:
    return [sys.executable, "-m", "cvrecipe", "tune", recipe, "--space", str(space), *args]


def env(cache: Path | None = None) -> dict:
    extra = {"CVRECIPE_CACHE": str(cache)} if cache is not None else {}
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_tune(cwd: Path, space: Path, *args: str, timeout: float = 900, cache: Path | None = None
             ) -> subprocess.CompletedProcess:
    out = subprocess.run(tune_command(space, *args), cwd=cwd, env=env(cache), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"cvrecipe tune failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def load(storage: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def sqlite_url(cwd: Path, study: str) -> str:
    return f"sqlite:///{(cwd / 'runs' / study / 'study.db').resolve()}"
