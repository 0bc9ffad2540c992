"""Fetch, check and unpack the Flickr8k release archives.

`download_flickr8k(root)` downloads `Flickr8k_text.zip` and `Flickr8k_Dataset.zip` (the
release most Flickr8k work uses) and lays them out the way `captioner.data.load_flickr8k`
reads them:

    root/images/<id>.jpg
    root/Flickr8k.token.txt
    root/Flickr_8k.{train,dev,test}Images.txt   (and the other text files of the release)

Archives stream to `<name>.part` and are renamed only once they are known to be whole zips
holding the expected members, so a file under its final name is always complete. An archive
already in `root` is used as is, which is also how to install by hand on a machine without
internet: copy the two zips into `root` and run again. Unpacking goes to a temporary folder
inside `root` first, so a failed run leaves no half layout. Problems raise `DownloadError`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from http.client import HTTPException, HTTPResponse
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from tqdm import tqdm

__all__ = ["DEFAULT_BASE_URL", "DownloadError", "download_flickr8k"]

DEFAULT_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
TEXT_ARCHIVE = "Flickr8k_text.zip"
DATASET_ARCHIVE = "Flickr8k_Dataset.zip"
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")
IMAGE_DIR = "images"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download, check or unpack step failed; the message names the URL or file."""


def download_flickr8k(
    root: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    keep_archives: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and unpack Flickr8k into `root`; return `root`.

    Does nothing if `root` already holds the unpacked layout. Archives already present in
    `root` are not downloaded again; they are deleted after unpacking unless `keep_archives`.
    """
    root = Path(root)
    if _layout_complete(root):
        _warn(f"Flickr8k is already in {root}; nothing to download")
        return root
    root.mkdir(parents=True, exist_ok=True)

    archives: dict[str, Path] = {}
    for name, required, need_jpg in (
        (TEXT_ARCHIVE, (TOKEN_FILE, *SPLIT_FILES), False),
        (DATASET_ARCHIVE, (), True),
    ):
        url = base_url.rstrip("/") + "/" + name
        archives[name] = _fetch_checked(url, root / name, required, need_jpg, timeout)

    _unpack(root, text_zip=archives[TEXT_ARCHIVE], image_zip=archives[DATASET_ARCHIVE])
    _report_missing_images(root)
    if not keep_archives:
        for path in archives.values():
            path.unlink(missing_ok=True)
    return root


def _layout_complete(root: Path) -> bool:
    texts = all((root / name).is_file() for name in (TOKEN_FILE, *SPLIT_FILES))
    return texts and (root / IMAGE_DIR).is_dir() and any((root / IMAGE_DIR).glob("*.jpg"))


def _fetch_checked(url: str, dest: Path, required: tuple[str, ...], need_jpg: bool, timeout: float) -> Path:
    """Return `dest`, downloading it first unless a valid copy is already there."""
    if dest.exists():
        try:
            _check_archive(dest, str(dest), required, need_jpg)
            _warn(f"using {dest} already on disk")
            return dest
        except DownloadError as error:
            _warn(f"{error}; downloading it again")

    part = dest.with_name(dest.name + ".part")
    _download(url, part, dest, timeout)
    try:
        _check_archive(part, f"{dest.name} downloaded from {url}", required, need_jpg)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _download(url: str, part: Path, dest: Path, timeout: float) -> None:
    """Stream `url` into `part`, resuming a previous partial download where the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, dest, timeout)
    if response is None:
        part.unlink()
        offset = 0
        response = _open(url, 0, dest, timeout)
    with response:
        if response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, file=sys.stderr,
            ) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, HTTPException) as error:
            raise DownloadError(f"download of {url} was interrupted ({error}); run again to resume") from error
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run again to resume")


def _open(url: str, offset: int, dest: Path, timeout: float) -> HTTPResponse | None:
    """Open `url` from byte `offset`; None means the server refused that range (416)."""
    request = Request(url, headers={"User-Agent": "captioner-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urlopen(request, timeout=timeout)
    except HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            return None
        raise DownloadError(f"could not download {url}: HTTP error {error.code} {error.reason}") from error
    except ValueError as error:
        raise DownloadError(f"invalid download URL {url}: {error}") from error
    except (OSError, HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"could not reach {url} ({reason}). This machine may have no internet access: "
            f"download the file elsewhere and copy it to {dest}, then run again "
            f"(archives found there are checked and unpacked without downloading)"
        ) from error


def _check_archive(path: Path, where: str, required: tuple[str, ...], need_jpg: bool) -> None:
    if not zipfile.is_zipfile(path):
        raise DownloadError(f"{where} is not a zip archive (corrupt or wrong file)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = [n for n in archive.namelist() if _usable(n)]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DownloadError(f"{where} is corrupt: {error}") from error
    if bad is not None:
        raise DownloadError(f"{where} is corrupt: bad CRC for member {bad}")
    basenames = {PurePosixPath(n).name for n in names}
    missing = [name for name in required if name not in basenames]
    if missing:
        raise DownloadError(f"{where} lacks expected member(s): {', '.join(missing)}")
    if need_jpg and not any(n.lower().endswith(".jpg") for n in basenames):
        raise DownloadError(f"{where} holds no .jpg images")


def _usable(member: str) -> bool:
    """True for a regular member that is safe to unpack (no junk, no path tricks)."""
    name = member.replace("\\", "/")
    if name.endswith("/") or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return False
    parts = PurePosixPath(name).parts
    return not any(p == ".." or p == "__MACOSX" or p.startswith(".") for p in parts)


def _unpack(root: Path, text_zip: Path, image_zip: Path) -> None:
    """Unpack into a temporary folder inside `root`, then move the result into place."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        images = staging / IMAGE_DIR
        images.mkdir()
        _extract_flat(image_zip, images, ".jpg")
        _extract_flat(text_zip, staging, ".txt")
        if (root / IMAGE_DIR).is_dir():
            for image in images.iterdir():
                os.replace(image, root / IMAGE_DIR / image.name)
        else:
            os.replace(images, root / IMAGE_DIR)
        texts = sorted(staging.glob("*.txt"), key=lambda p: p.name == TOKEN_FILE)
        for text in texts:
            os.replace(text, root / text.name)
    except (OSError, zipfile.BadZipFile, zlib.error) as error:
        raise DownloadError(f"could not unpack into {root}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_flat(archive_path: Path, target: Path, suffix: str) -> None:
    """Copy every usable member ending in `suffix` to `target/<basename>`."""
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.namelist():
            name = PurePosixPath(member.replace("\\", "/")).name
            if _usable(member) and name.lower().endswith(suffix):
                with archive.open(member) as source, open(target / name, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)


def _report_missing_images(root: Path) -> None:
    listed = set()
    for split in SPLIT_FILES:
        lines = (root / split).read_text(encoding="utf-8", errors="replace").splitlines()
        listed.update(line.strip() for line in lines if line.strip())
    missing = sorted(name for name in listed if not (root / IMAGE_DIR / name).is_file())
    if missing:
        examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        _warn(f"warning: {len(missing)} of {len(listed)} images named in the split files "
              f"are not in {root / IMAGE_DIR} ({examples})")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)
