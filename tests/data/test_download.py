"""Checksummed downloads against a real HTTP server on 127.0.0.1."""
import functools
import hashlib
import http.server
import threading

import pytest

from cvrecipe.data.download import DownloadError, fetch


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_verifies_md5_and_keeps_nothing_on_mismatch(file_server, tmp_path):
    root, url = file_server
    payload = b"idx bytes " * 1000
    (root / "data.gz").write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "cache" / "data.gz"
    assert fetch(f"{url}/data.gz", dest, md5).read_bytes() == payload
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(f"{url}/data.gz", tmp_path / "other.gz", "0" * 32)
    assert not (tmp_path / "other.gz").exists() and not (tmp_path / "other.gz.part").exists()


def test_mirror_redirects_and_missing_network_names_the_file(file_server, tmp_path, monkeypatch):
    root, url = file_server
    (root / "train.gz").write_bytes(b"abc")
    monkeypatch.setenv("CVRECIPE_MIRROR", url)
    got = fetch("https://unreachable.invalid/path/train.gz", tmp_path / "train.gz", hashlib.md5(b"abc").hexdigest())
    assert got.read_bytes() == b"abc"
    monkeypatch.setenv("CVRECIPE_MIRROR", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DownloadError, match=r"place the file at .*absent\.gz"):
        fetch("https://x/absent.gz", tmp_path / "absent.gz", "0" * 32)
