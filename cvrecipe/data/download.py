"""Checksummed downloads into the cache. Only used when no local copy of a dataset exists."""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

# Mirrors can be redirected (a local file server in tests, an internal mirror at a company).
MIRROR_ENV = "CVRECIPE_MIRROR"
TIMEOUT_S = 30  # per network operation; a dead network fails fast instead of hanging


class DownloadError(RuntimeError):
    pass


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str) -> Path:
    """Download `url` to `dest` unless a file with the right md5 is already there.

    The file is written to a temporary name and renamed only after its checksum matches, so an
    interrupted or corrupted download never leaves a file that looks complete.
    """
    if dest.is_file() and file_md5(dest) == md5:
        return dest
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        url = mirror.rstrip("/") + "/" + url.rsplit("/", 1)[-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url} ({err}); place the file at {dest} (md5 {md5}) to work offline"
        ) from err
    got = file_md5(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}")
    os.replace(tmp, dest)
    return dest
