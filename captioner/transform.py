"""The one image transform, shared by feature extraction, training, evaluation, the CLI and the app.

A user's photo goes through exactly what the training photos went through: decoded, turned
upright by its EXIF orientation, converted to RGB, resized to a square (the shared Flickr8k
images are 224x224 with aspect not kept, so the aspect is not kept here either) and normalised
with the encoder's statistics.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError


class ImageLoadError(ValueError):
    """A file that is not a readable image; the message names the file and the reason."""


ImageSource = str | Path | bytes | Image.Image

# ISO media files ("ftyp" box) holding a still image: HEIC/HEIF (phones' photos; Pillow reads them through the
# pillow-heif plugin, when installed) and AVIF (Pillow reads it itself).
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
_heif_opener: bool | None = None  # registered with Pillow (True), not installed (False), not tried yet (None)


def media_brand(head: bytes) -> bytes | None:
    """The brand of an ISO media file from its first 12 bytes (b"heic", b"avif", ...), or None."""
    return head[8:12] if len(head) >= 12 and head[4:8] == b"ftyp" else None


def heif_opener() -> bool:
    """Teach Pillow HEIC/HEIF with pillow-heif (`pip install pillow-heif`), once per process; False without it."""
    global _heif_opener
    if _heif_opener is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif_opener = False
        else:
            register_heif_opener()
            _heif_opener = True
    return _heif_opener


def _open(stream: BinaryIO, draft_size: int | None) -> Image.Image:
    """The image in `stream`, not decoded yet; a JPEG already set to decode at a reduced scale with draft_size."""
    head = stream.read(12)
    stream.seek(0)
    if draft_size and head.startswith(b"\xff\xd8\xff"):
        # A JPEG decoded at up to 1/8 scale costs what its draft does, so its size is checked after the draft:
        # Pillow's decompression-bomb check in Image.open (a warning past 89 megapixels, an error past 179) would
        # refuse a 200-megapixel phone photo and call a 108-megapixel one a "DOS attack".
        try:
            image = JpegImagePlugin.JpegImageFile(stream)
        except (SyntaxError, IndexError, TypeError, struct.error):  # damaged: Image.open gives Pillow's verdict
            stream.seek(0)
            return Image.open(stream)
        image.draft("RGB", (draft_size, draft_size))  # decode big JPEGs at a reduced scale: much faster
        if image.width * image.height > 2 * Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels even at 1/8 scale")
        return image
    if media_brand(head) in HEIF_BRANDS and not heif_opener():  # Pillow reads HEIC only through pillow-heif
        raise ImageLoadError("a HEIC/HEIF photo (the iPhone's format): pip install pillow-heif to read it, "
                             "or convert it to JPEG")
    return Image.open(stream)


def load_image(source: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Open any image Pillow reads as an upright RGB picture, or raise ImageLoadError."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as stream:
            with _open(stream, draft_size) as image:
                image.load()  # decode now, so truncated data fails here and not later
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageLoadError as error:
        raise ImageLoadError(f"{name}: {error}") from None
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{name}: is a directory, not an image") from None
    except PermissionError:
        raise ImageLoadError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: refused, too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float greyscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0
        scale = 255.0 / 65535.0 if high > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):  # transparent areas become white, not black
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass(frozen=True)
class ImageTransform:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> normalised float tensor [3, image_size, image_size]."""
        size = self.image_size
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        # numpy on this thread: torch's float32 arithmetic (bitwise the same), without waking torch's OpenMP threads
        # for 150k numbers: decoding and transforming a photo alone took 4.4 ms of CPU instead of 7.9 (same wall).
        pixels = np.asarray(image, dtype=np.float32)
        pixels /= 255
        pixels -= np.array(self.mean, dtype=np.float32)
        pixels /= np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def load(self, source: ImageSource) -> torch.Tensor:
        return self(load_image(source, draft_size=self.image_size))

    def key(self) -> str:
        return f"square{self.image_size}-bilinear-mean{','.join(f'{m:.4f}' for m in self.mean)}-std{','.join(f'{s:.4f}' for s in self.std)}"
