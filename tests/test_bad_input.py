"""Whatever is on a user's disk: each file is captioned correctly or reported with a reason, and the rest go on."""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.checkpoint import CheckpointError
from captioner.inference import EXAMPLES_DIR
from captioner.transform import ImageLoadError, load_image
from captioner.webapp import TABLE_HEADERS, caption_uploads

from conftest import free_port, load_app_py


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb for Pillow."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    return bytes(data)


def make_zoo(folder: Path, good_photo: Path) -> dict[str, str | None]:
    """Files of every awkward kind -> expected error fragment (None: must be captioned)."""
    folder.mkdir()
    photo = Image.open(good_photo)
    expected: dict[str, str | None] = {}

    def add(name: str, data: bytes | None = None, image: Image.Image | None = None, error: str | None = None, **save):
        path = folder / name
        if image is not None:
            image.save(path, **save)
        elif data is not None:
            path.write_bytes(data)
        expected[name] = error

    add("zero_bytes.jpg", b"", error="not an image")
    whole = io.BytesIO()
    photo.save(whole, format="JPEG", quality=95)
    add("truncated.jpg", whole.getvalue()[: len(whole.getvalue()) // 3], error="corrupt or truncated")
    add("text.jpg", b"just some words\n", error="not an image")
    add("png_named.jpg", image=photo, format="PNG")
    add("sixteen_bit.png", image=Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)))
    add("cmyk.jpg", image=photo.convert("CMYK"), format="JPEG")
    palette = photo.convert("P")
    add("palette_transparent.png", image=palette, transparency=0)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated.gif"] = None
    add("one_pixel.png", image=Image.new("RGB", (1, 1), (200, 10, 10)))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif_rotated.jpg", image=photo.transpose(Image.Transpose.ROTATE_90), exif=exif)
    add("bomb.png", png_claiming_size(40000, 40000), error="too many pixels")
    os.symlink(folder / "nowhere.jpg", folder / "broken_link.jpg")
    expected["broken_link.jpg"] = "file not found"
    odd = os.fsencode(str(folder)) + b"/caf\xe9_latin1.jpg"  # not valid UTF-8
    with open(odd, "wb") as handle:
        handle.write(whole.getvalue())
    expected["caf\\xe9_latin1.jpg"] = None
    return expected


@pytest.fixture
def zoo(tiny_flickr8k, tmp_path):
    folder = tmp_path / "zoo"
    return folder, make_zoo(folder, tiny_flickr8k / "images" / "red_circle_2.jpg")


def test_caption_command_handles_every_awkward_file(trained, zoo, tmp_path, capsys):
    folder, expected = zoo
    out = tmp_path / "zoo.jsonl"
    status = main(["caption", str(folder), "--checkpoint", str(trained[1] / "best.pt"), "--out", str(out),
                   "--batch-size", "4", "--no-progress"])
    assert status == 3
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(expected)
    for name, error in expected.items():
        if error is None:
            assert rows[name].get("caption"), (name, rows[name])
        else:
            assert error in rows[name]["error"] and name.split(".")[0] in rows[name]["error"], (name, rows[name])
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"failed {sum(e is not None for e in expected.values())}" in err


def test_exif_rotation_gives_the_caption_of_the_upright_photo(trained, tiny_flickr8k, tmp_path):
    captioner = Captioner.from_checkpoint(trained[1] / "best.pt")
    upright = tiny_flickr8k / "images" / "blue_square_2.jpg"
    photo = Image.open(upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; the viewer turns it 90 degrees clockwise
    stored = tmp_path / "stored_rotated.jpg"
    photo.transpose(Image.Transpose.ROTATE_90).save(stored, exif=exif, quality=95)
    assert np.abs(np.asarray(load_image(stored), dtype=int) - np.asarray(photo, dtype=int)).mean() < 8
    assert captioner.caption(stored).text == captioner.caption(upright).text


def test_unreadable_file_is_reported(trained, tiny_flickr8k, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    for name in ("a.jpg", "secret.jpg"):
        (folder / name).write_bytes((tiny_flickr8k / "images" / "red_circle_2.jpg").read_bytes())
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):  # root ignores chmod, so deny the way the OS would
        if str(file).endswith("secret.jpg"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    assert main(["caption", str(folder), "--checkpoint", str(trained[1] / "best.pt"), "--workers", "0",
                 "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert "secret.jpg: permission denied" in captured.err
    assert captured.out.count("\t") == 2


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent", "no such file or folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images found"),
])
def test_nothing_to_caption_is_one_clear_error(trained, tmp_path, capsys, make, message):
    assert main(["caption", str(make(tmp_path)), "--checkpoint", str(trained[1] / "best.pt")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


BAD_DEVICES = [("gpu", "unknown device 'gpu': use auto, cpu, cuda or cuda:N")] + (
    [("cuda:99", "this machine has")] if torch.cuda.is_available() else [("cuda", "sees no CUDA GPU here")])


@pytest.mark.parametrize("device, message", BAD_DEVICES)
def test_a_device_that_is_not_there_is_one_clear_error_everywhere(trained, tiny_flickr8k, tmp_path, capsys,
                                                                 device, message):
    app = load_app_py()
    config_path, _ = trained
    photo = str(tiny_flickr8k / "images" / "red_circle_2.jpg")
    checkpoint = str(trained[1] / "best.pt")
    runs = [["caption", photo, "--checkpoint", checkpoint, "--device", device],
            ["evaluate", "--checkpoint", checkpoint, "--device", device],
            ["train", "--config", str(config_path), "--set", f"train.device={device}",
             "--set", f"train.out_dir={tmp_path / 'run'}", "--no-progress"]]
    for argv in runs:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, argv
    assert not (tmp_path / "run").exists()  # refused before any work
    # A port of the test's own: by default the app first checks 7860, which another app on this machine may hold
    assert app.main(["--checkpoint", checkpoint, "--device", device, "--port", str(free_port())]) == 1
    assert message in capsys.readouterr().err


def test_app_function_survives_every_awkward_file(trained, zoo):
    folder, expected = zoo
    captioner = Captioner.from_checkpoint(trained[1] / "best.pt")
    files = sorted(str(p) for p in folder.iterdir() if "latin1" not in p.name)
    gallery, table = caption_uploads(captioner, files, "beam", 2, 10, 0.0, 2, 1)
    errors = {row[0] for row in table if row[TABLE_HEADERS.index("error")]}
    assert errors == {n for n, e in expected.items() if e is not None}
    assert len(gallery) == len(files) - len(errors)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(100_000, 100_000))
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(path)


def test_training_and_evaluation_leave_out_unreadable_dataset_images(trained, tiny_flickr8k, tmp_path, capsys):
    root = tmp_path / "damaged"
    shutil.copytree(tiny_flickr8k, root)
    (root / "images" / "red_circle_0.jpg").write_bytes(b"")  # train
    (root / "images" / "red_square_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # test
    status = main(["evaluate", "--checkpoint", str(trained[1] / "best.pt"), "--split", "test",
                   "--set", f"data.root={root}", "--set", f"train.cache_dir={tmp_path / 'cache'}", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0
    assert "red_square_2.jpg" in captured.err and "left out" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["images"] == 3
    config_path = tmp_path / "damaged.yaml"
    config = yaml.safe_load(trained[0].read_text())
    config["data"]["root"] = str(root)
    config["train"].update(out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), epochs=1)
    config_path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    assert "red_circle_0.jpg" in capsys.readouterr().err


def test_checkpoint_for_another_encoder_is_refused_with_a_reason(trained, tmp_path, capsys):
    payload = torch.load(trained[1] / "best.pt", weights_only=True)
    payload["config"]["encoder"].update(name="resnet18", weights="none")  # 512-d features, decoder wants 1280
    torch.save(payload, tmp_path / "other_encoder.pt")
    assert main(["caption", str(EXAMPLES_DIR), "--checkpoint", str(tmp_path / "other_encoder.pt")]) == 1
    err = capsys.readouterr().err
    assert "other_encoder.pt" in err and "1280" in err and "512" in err

    payload = torch.load(trained[1] / "best.pt", weights_only=True)
    payload["encoder"]["fingerprint"] = "0123456789abcdef"  # trained on other weights of the same network
    torch.save(payload, tmp_path / "other_weights.pt")
    with pytest.raises(CheckpointError, match="other_weights.pt: trained on features of .*0123456789abcdef"):
        Captioner.from_checkpoint(tmp_path / "other_weights.pt")  # the one rule, for every command and the API
    for command in (["caption", str(EXAMPLES_DIR)], ["evaluate", "--no-progress"]):
        assert main([*command, "--checkpoint", str(tmp_path / "other_weights.pt")]) == 1
        assert "fingerprint 0123456789abcdef" in capsys.readouterr().err


def test_phone_photos_avif_and_heic_are_found_in_folders_and_captioned(trained, tiny_flickr8k, tmp_path, monkeypatch):
    import captioner.transform as transform

    photo = Image.open(tiny_flickr8k / "images" / "red_square_2.jpg")
    folder = tmp_path / "phone"
    folder.mkdir()
    photo.save(folder / "IMG_0001.avif", quality=95)
    photo.save(folder / "IMG_0002", format="AVIF", quality=95)  # no suffix: found by its content
    (folder / "IMG_0003.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))  # a HEIC header, no photo behind it
    (folder / "notes.txt").write_text("not a photo")
    monkeypatch.setattr(transform, "_heif_opener", False)  # as without pillow-heif
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(folder), "--checkpoint", str(trained[1] / "best.pt"), "--out", str(out),
                 "--no-progress"]) == 3
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"IMG_0001.avif", "IMG_0002", "IMG_0003.HEIC"}
    assert rows["IMG_0001.avif"]["caption"] and rows["IMG_0002"]["caption"]
    assert "HEIC/HEIF photo" in rows["IMG_0003.HEIC"]["error"] and "pip install pillow-heif" in rows["IMG_0003.HEIC"]["error"]


def test_heic_photos_are_captioned_with_pillow_heif_and_shown_in_the_app(trained, tiny_flickr8k, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="pip install pillow-heif (in the test extra)")
    photo = Image.open(tiny_flickr8k / "images" / "red_square_2.jpg")
    pillow_heif.from_pillow(photo).save(tmp_path / "IMG_0004.HEIC", quality=95)
    photo.save(tmp_path / "scan.tiff")
    captioner = Captioner.from_checkpoint(trained[1] / "best.pt")
    paths = [str(tmp_path / "IMG_0004.HEIC"), str(tmp_path / "scan.tiff"), str(tiny_flickr8k / "images" / "red_square_2.jpg")]
    captions = captioner.caption(paths)
    assert "red" in captions[0].text and "square" in captions[0].text, captions[0].text
    gallery, table = caption_uploads(captioner, paths)
    assert not any(row[TABLE_HEADERS.index("error")] for row in table)
    # Browsers show neither HEIC nor TIFF: the gallery gets a JPEG preview of them (in the app's temp folder,
    # forgotten with the upload); a JPEG goes as it is.
    shown = [path for path, _ in gallery]
    assert shown[2] == paths[2] and all(path not in paths and path.endswith(".jpg") for path in shown[:2])
    assert [Image.open(path).format for path in shown[:2]] == ["JPEG", "JPEG"]
