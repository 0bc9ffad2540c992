"""Tests for captioner.download against tiny Flickr8k-like archives served from 127.0.0.1."""

from __future__ import annotations

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from captioner import download as dl
from captioner.download import DownloadError, download_flickr8k
from conftest import free_port

IMAGES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg", "1003163366_44323f5815.jpg"]
SPLITS = {
    "Flickr_8k.trainImages.txt": IMAGES[:2],
    "Flickr_8k.devImages.txt": IMAGES[2:3],
    "Flickr_8k.testImages.txt": IMAGES[3:],
}


def jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
    return buffer.getvalue()


def dataset_zip(extra: dict[str, bytes] | None = None) -> bytes:
    members = {"Flicker8k_Dataset/": b""}
    for i, name in enumerate(IMAGES):
        members[f"Flicker8k_Dataset/{name}"] = jpeg_bytes((60 * i, 100, 200))
    members["__MACOSX/Flicker8k_Dataset/._" + IMAGES[0]] = b"\x00\x05\x16\x07junk"
    members["Flicker8k_Dataset/.DS_Store"] = b"junk"
    members.update(extra or {})
    return make_zip(members, zipfile.ZIP_STORED)


def text_zip(prefix: str = "", splits: dict[str, list[str]] = SPLITS, token: bool = True,
             extra: dict[str, bytes] | None = None) -> bytes:
    members = {}
    if token:
        lines = [f"{name}#{n}\tA caption number {n} .\n" for name in IMAGES for n in range(5)]
        members[prefix + "Flickr8k.token.txt"] = "".join(lines).encode()
    members[prefix + "Flickr8k.lemma.token.txt"] = b"lemma\n"
    members[prefix + "readme.txt"] = b"Flickr8k readme\n"
    for name, ids in splits.items():
        members[prefix + name] = "".join(i + "\n" for i in ids).encode()
    members["__MACOSX/._Flickr8k.token.txt"] = b"junk"
    members.update(extra or {})
    return make_zip(members)


@pytest.fixture
def server():
    """A local server for files[name] under /Flickr8k/, logging (name, Range header) per request."""
    state = SimpleNamespace(files={}, requests=[], supports_range=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            state.requests.append((name, self.headers.get("Range")))
            data = state.files.get(name)
            if data is None or not self.path.startswith("/Flickr8k/"):
                self.send_error(404)
                return
            start = 0
            ranged = self.headers.get("Range", "")
            if state.supports_range and ranged.startswith("bytes=") and ranged.endswith("-"):
                start = int(ranged[6:-1])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/Flickr8k/"
    state.files.update({"Flickr8k_text.zip": text_zip(), "Flickr8k_Dataset.zip": dataset_zip()})
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def downloads(server) -> list[str]:
    return [name for name, _ in server.requests]


def assert_layout(root: Path) -> None:
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(IMAGES)
    for image in (root / "images").iterdir():
        with Image.open(image) as picture:
            picture.verify()
    for name, ids in SPLITS.items():
        assert (root / name).read_text().split() == ids
    assert len((root / "Flickr8k.token.txt").read_text().splitlines()) == 5 * len(IMAGES)
    assert (root / "Flickr8k.lemma.token.txt").is_file() and (root / "readme.txt").is_file()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".") or p.suffix == ".part"]
    assert leftovers == []
    assert not (root / "__MACOSX").exists() and not (root / "images" / ".DS_Store").exists()


@pytest.mark.parametrize("prefix", ["", "Flickr8k_text/"])
def test_download_produces_layout(server, tmp_path, prefix):
    server.files["Flickr8k_text.zip"] = text_zip(prefix)
    root = tmp_path / "flickr8k"
    assert download_flickr8k(root, base_url=server.base_url) == root
    assert_layout(root)
    assert sorted(downloads(server)) == ["Flickr8k_Dataset.zip", "Flickr8k_text.zip"]
    assert not (root / "Flickr8k_text.zip").exists() and not (root / "Flickr8k_Dataset.zip").exists()


def test_base_url_without_trailing_slash(server, tmp_path):
    download_flickr8k(tmp_path, base_url=server.base_url.rstrip("/"))
    assert_layout(tmp_path)


def test_rerun_skips_download(server, tmp_path):
    download_flickr8k(tmp_path, base_url=server.base_url, keep_archives=True)
    assert (tmp_path / "Flickr8k_text.zip").is_file() and (tmp_path / "Flickr8k_Dataset.zip").is_file()
    assert len(server.requests) == 2

    download_flickr8k(tmp_path, base_url=server.base_url, keep_archives=True)
    assert len(server.requests) == 2

    # Layout gone but archives kept: unpack again from the archives, still no request.
    for path in tmp_path.glob("*.txt"):
        path.unlink()
    for path in (tmp_path / "images").iterdir():
        path.unlink()
    (tmp_path / "images").rmdir()
    download_flickr8k(tmp_path, base_url=server.base_url)
    assert len(server.requests) == 2
    assert_layout(tmp_path)
    assert not (tmp_path / "Flickr8k_text.zip").exists()


def test_archives_placed_by_hand_need_no_network(tmp_path):
    (tmp_path / "Flickr8k_text.zip").write_bytes(text_zip())
    (tmp_path / "Flickr8k_Dataset.zip").write_bytes(dataset_zip())
    download_flickr8k(tmp_path, base_url=f"http://127.0.0.1:{closed_port()}/", keep_archives=True)
    assert_layout(tmp_path)


def test_invalid_archive_on_disk_is_downloaded_again(server, tmp_path):
    (tmp_path / "Flickr8k_text.zip").write_bytes(b"half a file")
    download_flickr8k(tmp_path, base_url=server.base_url)
    assert_layout(tmp_path)
    assert "Flickr8k_text.zip" in downloads(server)


@pytest.mark.parametrize("supports_range", [True, False])
def test_partial_download_is_resumed_or_restarted(server, tmp_path, supports_range):
    server.supports_range = supports_range
    data = server.files["Flickr8k_Dataset.zip"]
    (tmp_path / "Flickr8k_Dataset.zip.part").write_bytes(data[: len(data) // 2])
    download_flickr8k(tmp_path, base_url=server.base_url)
    assert_layout(tmp_path)
    assert ("Flickr8k_Dataset.zip", f"bytes={len(data) // 2}-") in server.requests


def test_complete_part_file_with_416_restarts(server, tmp_path):
    data = server.files["Flickr8k_text.zip"]
    (tmp_path / "Flickr8k_text.zip.part").write_bytes(data + b"extra")
    download_flickr8k(tmp_path, base_url=server.base_url)
    assert_layout(tmp_path)
    assert [r for r in server.requests if r[0] == "Flickr8k_text.zip"] == [
        ("Flickr8k_text.zip", f"bytes={len(data) + 5}-"), ("Flickr8k_text.zip", None)]


def test_not_a_zip_raises_naming_file(server, tmp_path):
    server.files["Flickr8k_Dataset.zip"] = b"<html>Rate limit exceeded</html>"
    with pytest.raises(DownloadError, match=r"Flickr8k_Dataset\.zip.*not a zip"):
        download_flickr8k(tmp_path, base_url=server.base_url)
    assert not (tmp_path / "Flickr8k_Dataset.zip").exists()
    assert not (tmp_path / "Flickr8k_Dataset.zip.part").exists()
    assert not (tmp_path / "images").exists()


def test_bad_crc_raises(server, tmp_path):
    data = bytearray(server.files["Flickr8k_Dataset.zip"])
    image = jpeg_bytes((60, 100, 200))
    at = data.find(image) + len(image) // 2
    data[at] ^= 0xFF
    server.files["Flickr8k_Dataset.zip"] = bytes(data)
    with pytest.raises(DownloadError, match=r"Flickr8k_Dataset\.zip.*corrupt.*" + IMAGES[1]):
        download_flickr8k(tmp_path, base_url=server.base_url)
    assert not (tmp_path / "Flickr8k_Dataset.zip").exists()


def test_http_404_raises_naming_url(server, tmp_path):
    del server.files["Flickr8k_text.zip"]
    with pytest.raises(DownloadError, match="404") as caught:
        download_flickr8k(tmp_path, base_url=server.base_url)
    assert server.base_url + "Flickr8k_text.zip" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_hints_at_manual_install(tmp_path):
    with pytest.raises(DownloadError, match="no internet") as caught:
        download_flickr8k(tmp_path, base_url=f"http://127.0.0.1:{closed_port()}/Flickr8k/", timeout=5)
    assert str(tmp_path / "Flickr8k_text.zip") in str(caught.value)


def test_missing_token_file_raises(server, tmp_path):
    server.files["Flickr8k_text.zip"] = text_zip(token=False)
    with pytest.raises(DownloadError, match=r"Flickr8k_text\.zip.*Flickr8k\.token\.txt"):
        download_flickr8k(tmp_path, base_url=server.base_url)
    assert not (tmp_path / "Flickr8k_text.zip").exists()
    assert not (tmp_path / "Flickr8k_text.zip.part").exists()


def test_dataset_without_images_raises(server, tmp_path):
    server.files["Flickr8k_Dataset.zip"] = make_zip({"Flicker8k_Dataset/": b"", "__MACOSX/._a.jpg": b"x"})
    with pytest.raises(DownloadError, match=r"Flickr8k_Dataset\.zip.*no \.jpg"):
        download_flickr8k(tmp_path, base_url=server.base_url)


def test_malicious_members_stay_out(server, tmp_path):
    server.files["Flickr8k_text.zip"] = text_zip(extra={"../evil.txt": b"evil", "/abs_evil.txt": b"evil"})
    server.files["Flickr8k_Dataset.zip"] = dataset_zip(extra={"../../evil.jpg": jpeg_bytes((0, 0, 0))})
    root = tmp_path / "deep" / "root"
    download_flickr8k(root, base_url=server.base_url)
    assert_layout(root)
    assert not (root.parent / "evil.txt").exists() and not (tmp_path / "evil.jpg").exists()
    assert not (root / "evil.txt").exists() and not (root / "abs_evil.txt").exists()


def test_missing_split_images_only_warn(server, tmp_path, capsys):
    splits = dict(SPLITS, **{"Flickr_8k.testImages.txt": IMAGES[3:] + ["2258277193_586949ec62.jpg"]})
    server.files["Flickr8k_text.zip"] = text_zip(splits=splits)
    download_flickr8k(tmp_path, base_url=server.base_url)
    assert "1 of 5 images" in capsys.readouterr().err
    assert len(list((tmp_path / "images").iterdir())) == len(IMAGES)


def test_failed_unpack_leaves_no_half_layout(server, tmp_path, monkeypatch):
    calls = []
    real_copy = dl.shutil.copyfileobj

    def failing_copy(source, target, length=0):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        real_copy(source, target, length)

    monkeypatch.setattr(dl.shutil, "copyfileobj", failing_copy)
    with pytest.raises(DownloadError, match="No space left"):
        download_flickr8k(tmp_path, base_url=server.base_url, keep_archives=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Flickr8k_Dataset.zip", "Flickr8k_text.zip"]


def closed_port() -> int:
    """A port where nothing listens, for the whole session: connecting to it is refused (conftest.free_port holds
    it bound; a port merely found free could be taken by another process and answer)."""
    return free_port()
