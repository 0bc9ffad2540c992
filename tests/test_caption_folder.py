"""`captioner caption` on folders: content sniffing, bad files reported, resumable output, exit codes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from captioner.caption import collect_images
from captioner.cli import main
from captioner.inference import EXAMPLES_DIR


@pytest.fixture
def mixed_folder(tiny_flickr8k, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub" / "deeper").mkdir(parents=True)
    images = tiny_flickr8k / "images"
    shutil.copy(images / "red_circle_2.jpg", folder / "a_red.jpg")
    shutil.copy(images / "blue_square_2.jpg", folder / "sub" / "b_blue.jpg")
    from PIL import Image
    Image.open(images / "green_circle_2.jpg").save(folder / "sub" / "deeper" / "c_green.data", format="PNG")
    (folder / "notes.txt").write_text("not an image, not named like one")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def test_collect_images_sniffs_content_and_keeps_a_fixed_order(mixed_folder):
    paths, problems, skipped = collect_images([str(mixed_folder)])
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == ["a_red.jpg", "b_blue.jpg", "broken.jpg", "c_green.data"]
    assert problems == [] and skipped == 1
    _, problems, _ = collect_images([str(mixed_folder / "absent")])
    assert "no such file or folder" in problems[0][1]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_every_good_image_gets_a_caption_and_every_bad_one_an_error(trained, mixed_folder, tmp_path, suffix, capsys):
    _, run = trained
    out = tmp_path / f"captions.{suffix}"
    status = main(["caption", str(mixed_folder), "--checkpoint", str(run / "best.pt"), "--out", str(out),
                   "--batch-size", "2", "--no-progress"])
    assert status == 3
    rows = read(out)
    assert len(rows) == 4
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert "corrupt or truncated" in by_name["broken.jpg"]["error"] or "not an image" in by_name["broken.jpg"]["error"]
    for name in ("a_red.jpg", "b_blue.jpg", "c_green.data"):
        assert by_name[name]["caption"] and float(by_name[name]["score"]) < 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "captioned 3, failed 1, skipped 1" in err


def test_a_reader_that_stops_early_ends_the_run_quietly(trained, tiny_flickr8k, tmp_path):
    """`captioner caption DIR | head -1`: the run stops without a traceback or an error, as other tools do."""
    _, run = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("red_circle_2.jpg", "blue_square_2.jpg"):
        shutil.copy(tiny_flickr8k / "images" / name, folder / name)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first caption is written
    try:
        result = subprocess.run([sys.executable, "-m", "captioner", "caption", str(folder), "--checkpoint",
                                 str(run / "best.pt"), "--no-progress"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


def read(path):
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rerun_after_an_interruption_gives_exactly_one_row_per_image(trained, mixed_folder, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "captions.jsonl"
    checkpoint = str(run / "best.pt")
    main(["caption", str(mixed_folder), "--checkpoint", checkpoint, "--out", str(out), "--no-progress"])
    first = read(out)
    good = [r for r in first if "caption" in r]
    out.write_text(json.dumps(good[0]) + "\n" + json.dumps(first[-1])[:25])  # as if killed mid-write
    assert main(["caption", str(mixed_folder), "--checkpoint", checkpoint, "--out", str(out), "--no-progress"]) == 3
    assert "1 images already captioned" in capsys.readouterr().err
    rows = read(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in first)
    assert rows[0] == good[0]
    (mixed_folder / "sub" / "broken.jpg").unlink()
    assert main(["caption", str(mixed_folder), "--checkpoint", checkpoint, "--out", str(out), "--no-progress"]) == 0
    rows = read(out)
    assert len(rows) == 3 and all("caption" in r for r in rows)
    assert "3 done before" in capsys.readouterr().err
    assert main(["caption", str(mixed_folder), "--checkpoint", checkpoint, "--out", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert "done before" not in capsys.readouterr().err and len(read(out)) == 3


def test_a_photo_captioned_alone_gets_the_row_the_folder_command_writes_for_it(trained, mixed_folder, tmp_path):
    # Two routes to one caption: Captioner.caption on the file alone (loaded in process, searched alone) and
    # `captioner caption DIR` (files read by the batch loader, searched in one batch with the folder's others).
    from captioner import Captioner

    _, run = trained
    out = tmp_path / "captions.jsonl"
    main(["caption", str(mixed_folder), "--checkpoint", str(run / "best.pt"), "--out", str(out), "--batch-size", "3",
          "--beam-size", "3", "--no-progress"])
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in read(out)}
    captioner = Captioner.from_checkpoint(run / "best.pt")
    for name in ("a_red.jpg", "sub/b_blue.jpg", "sub/deeper/c_green.data"):
        alone = captioner.caption(str(mixed_folder / name), beam_size=3)
        row = rows[name.rsplit("/", 1)[-1]]
        assert row["caption"] == alone.text
        assert row["score"] == pytest.approx(alone.score, abs=1e-4)  # rows keep 4 decimals
        assert row["tags"] == [[w, pytest.approx(p, abs=1e-4)] for w, p in alone.tags]
        if alone.confidence is not None:
            assert row["confidence"] == pytest.approx(alone.confidence, abs=1e-3) and row["unsure"] == alone.unsure


def test_out_in_a_new_folder_is_made_and_bad_workers_are_refused(trained, tiny_flickr8k, tmp_path, capsys):
    checkpoint = str(trained[1] / "best.pt")
    photo = str(tiny_flickr8k / "images" / "red_circle_2.jpg")
    out = tmp_path / "new" / "deeper" / "captions.jsonl"
    assert main(["caption", photo, "--checkpoint", checkpoint, "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["caption"]
    assert main(["caption", photo, "--checkpoint", checkpoint, "--workers", "-1"]) == 1
    assert "--workers must be >= 0" in capsys.readouterr().err
    assert main(["caption", photo, "--checkpoint", checkpoint, "--engine", "ray", "--workers", "2"]) == 1
    assert "--workers is for the local engine" in capsys.readouterr().err  # refused, not silently dropped


def test_set_changes_the_routing_of_a_captioning_run_and_not_the_model(tmp_path, capsys):
    cat, out = str(EXAMPLES_DIR / "cat.jpg"), tmp_path / "rows.jsonl"
    assert main(["caption", cat, "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["from_tags"]  # the shipped model writes the cat from its tags
    checks_off = ["--set", "routing.unsure_below=0", "--set", "routing.unseen_dog_below=0",
                  "--set", "routing.unseen_person_below=0"]
    assert main(["caption", cat, "--out", str(out), "--overwrite", "--no-progress", *checks_off]) == 0
    row = json.loads(out.read_text())
    assert not row["from_tags"] and not row["unsure"]  # the photo decoder's caption, trusted
    capsys.readouterr()
    assert main(["caption", cat, "--set", "decoder.hidden_dim=8"]) == 1
    assert "decoder.hidden_dim describes the trained model" in capsys.readouterr().err
