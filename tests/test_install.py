"""cvrecipe as a user installs it: the wheel built from this checkout, installed into a fresh venv
outside it, runs a shipped recipe end to end from an empty directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and a venv, then trains

CHECK_INSTALL = """
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
import cvrecipe
dist = md.distribution("cvrecipe")
unmet = []
for text in dist.requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement (pip install 'cvrecipe[serve]'), not the base package's
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(version, prereleases=True):
        unmet.append(f"{req} (found {version})")
print(json.dumps({"module": cvrecipe.__file__, "metadata": str(dist.locate_file("")), "unmet": unmet}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding only the wheel (no dependencies of its own, see below)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so that building leaves no build/ or egg-info in the checkout
    for name in ("cvrecipe", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (ROOT / name).is_dir() else {}))
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("cvrecipe-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The dependencies (torch alone is 5.5 GB) come from the test environment's own site-packages,
    # through a .pth file holding its path as a plain line: Python adds the folder to sys.path after
    # the venv's own site-packages and does not read the .pth files in it, so the editable install's
    # finder (which would import cvrecipe from the checkout) stays out. The venv's cvrecipe is the wheel.
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=600)
    return venv / "bin"


def user_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "CVRECIPE_CACHE": str(tmp / "cache"), "COLUMNS": "200"}


def test_the_wheel_is_what_the_fresh_venv_imports_and_its_requirements_are_met(installed, tmp_path):
    out = subprocess.run([str(installed / "python"), "-c", CHECK_INSTALL], cwd=tmp_path, env=user_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    venv = installed.parent
    assert Path(found["module"]).is_relative_to(venv), found  # not the checkout's cvrecipe
    assert Path(found["metadata"]).is_relative_to(venv), found
    assert found["unmet"] == []


def test_an_installed_cvrecipe_runs_a_shipped_recipe_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = user_env(tmp_path)

    def cvrecipe(*args: str) -> str:
        out = subprocess.run([str(installed / "cvrecipe"), *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, f"cvrecipe {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    listed = cvrecipe("recipes")
    assert "digits-quick" in listed and "fashion-mnist" in listed and str(installed.parent) in listed
    assert "name: fashion-mnist" in cvrecipe("config")  # the default recipe, resolved from the package
    assert "CVRECIPE_DATA" in cvrecipe("config", "--explain", "paths")
    cvrecipe("run", "digits-quick")
    run = work / "runs" / "digits-quick"
    report = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
    assert report is not None and report["accuracy"] > 0.5, sorted(p.name for p in run.iterdir())
    assert (run / "report.html").is_file()
