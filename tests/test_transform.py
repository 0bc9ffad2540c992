"""The one image transform: any photo a user has becomes the tensor the model was trained on."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoder import TF_LITE_MEAN, TF_LITE_STD
from captioner.transform import ImageLoadError, ImageTransform, load_image

transform = ImageTransform(64, TF_LITE_MEAN, TF_LITE_STD)


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_output_shape_and_normalisation(tmp_path):
    path = save(Image.new("RGB", (300, 200), (127, 127, 127)), tmp_path / "grey.png")
    tensor = transform.load(path)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01  # 127/255 is the Lite models' mean


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # blue on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 80  # the blue half is now on top


@pytest.mark.parametrize("make", [
    lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
    lambda: Image.new("L", (16, 16), 128),
    lambda: Image.new("LA", (16, 16), (128, 0)),
    lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 0)),
    lambda: Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)),
    lambda: Image.new("1", (16, 16), 1),
])
def test_any_mode_becomes_rgb(make):
    image = load_image(make())
    assert image.mode == "RGB" and image.size == (16, 16)


def test_transparency_becomes_white_not_black(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    path = save(palette, tmp_path / "transparent.png", transparency=0)
    assert np.asarray(load_image(path)).min() == 255


def test_sixteen_bit_png_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = save(Image.fromarray(ramp), tmp_path / "deep.png")
    pixels = np.asarray(load_image(path))
    assert pixels.min() < 5 and pixels.max() > 250


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_image(path))[8, 8]) == (255, 0, 0)


def test_bytes_and_wrong_extension_are_fine(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (0, 255, 0)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (10, 10)
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(buffer.getvalue())
    assert transform.load(path).shape == (3, 64, 64)


@pytest.mark.parametrize("content, reason", [
    (b"", "not an image"),
    (b"hello, I am text", "not an image"),
])
def test_non_images_raise_a_clear_error(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as error:
        load_image(path)
    assert "fake.jpg" in str(error.value)


def test_truncated_jpeg_and_missing_file(tmp_path):
    whole = tmp_path / "whole.jpg"
    Image.effect_noise((128, 128), 60).convert("RGB").save(whole, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: corrupt or truncated"):
        load_image(cut)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")


def test_a_phone_camera_200_megapixel_jpeg_is_read_at_a_reduced_scale_without_bomb_warnings(tmp_path, recwarn):
    """Pillow's decompression-bomb check refuses past 179 megapixels and warns of a "DOS attack" past 89; a JPEG is
    decoded at up to 1/8 scale here, so 200- and 108-megapixel photos (Samsung's, Xiaomi's) are read, silently.
    A PNG of that size is still refused: it would be decoded whole."""
    for width, height in ((16384, 12288), (12000, 9000)):
        path = save(Image.new("L", (width, height), 90), tmp_path / f"{width}.jpg", quality=50)
        assert transform.load(path).shape == (3, 64, 64)
        assert transform.load(path.read_bytes()).shape == (3, 64, 64)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    wide = tmp_path / "wide.png"
    Image.new("1", (16384, 12288)).save(wide)
    with pytest.raises(ImageLoadError, match="wide.png: refused, too many pixels"):
        transform.load(wide)
