"""Dataset loaders: Flickr8k release layout, Karpathy JSON, CSV; quirks reported, not hidden."""
from __future__ import annotations

import json
import shutil

import pytest

from captioner.data import DatasetError, load_csv, load_flickr8k, load_karpathy_json
from conftest import SHARED_FLICKR8K, make_flickr8k


def test_flickr8k_layout_gives_splits_with_five_captions(tiny_flickr8k):
    dataset = load_flickr8k(tiny_flickr8k)
    assert [len(dataset.split(s)) for s in ("train", "dev", "test")] == [16, 4, 4]
    record = dataset.split("train")[0]
    assert record.path.is_file() and len(record.captions) == 5
    assert dataset.split("val") == dataset.split("dev")


def test_flickr8k_quirks_are_reported(tmp_path):
    root = make_flickr8k(tmp_path / "f8k")
    (root / "images" / "red_circle_0.jpg").unlink()  # captioned, in train, but no file
    with open(root / "Flickr8k.token.txt", "a") as tokens:
        tokens.write("orphan.jpg#0\tA picture in no split .\n")
    shutil.copy(root / "images" / "blue_square_1.jpg", root / "images" / "orphan.jpg")
    shutil.copy(root / "images" / "blue_square_0.jpg", root / "images" / "blue_square_2.jpg")  # same bytes, train+test
    dataset = load_flickr8k(root)
    notes = "\n".join(dataset.notes)
    assert "red_circle_0.jpg has captions but no image file" in notes
    assert "1 captioned images belong to no split" in notes
    assert "LEAKAGE across splits" in notes and "blue_square_2.jpg" in notes
    assert len(dataset.split("train")) == 15


def test_flickr8k_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="captioner download flickr8k"):
        load_flickr8k(tmp_path / "absent")
    root = make_flickr8k(tmp_path / "f8k")
    (root / "Flickr8k.token.txt").write_text("no tab on this line\n")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:1"):
        load_flickr8k(root)


def test_karpathy_json(tiny_flickr8k, tmp_path):
    images = [{"filename": "red_circle_0.jpg", "filepath": "images", "split": "train",
               "sentences": [{"tokens": ["a", "red", "circle"], "raw": "A red circle."}]},
              {"filename": "blue_square_0.jpg", "filepath": "images", "split": "restval",
               "sentences": [{"tokens": ["a", "blue", "square"]}]},
              {"filename": "red_square_2.jpg", "filepath": "images", "split": "val",
               "sentences": [{"tokens": ["red"]}]},
              {"filename": "missing.jpg", "filepath": "images", "split": "test", "sentences": []}]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    dataset = load_karpathy_json(path, tiny_flickr8k)
    assert len(dataset.splits["train"]) == 2 and len(dataset.splits["dev"]) == 1
    assert dataset.splits["train"][1].captions == ["a blue square"]
    assert any("missing.jpg" in n for n in dataset.notes)
    path.write_text("{}")
    with pytest.raises(DatasetError, match="not a Karpathy split JSON"):
        load_karpathy_json(path, tiny_flickr8k)


def test_csv_with_and_without_split_column(tiny_flickr8k, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("image,caption,split\nimages/red_circle_0.jpg,a red circle,train\n"
                    "images/red_circle_0.jpg,\"a circle, red\",train\nimages/blue_square_0.jpg,a blue square,test\n")
    dataset = load_csv(path, tiny_flickr8k)
    assert dataset.splits["train"][0].captions == ["a red circle", "a circle, red"]
    assert len(dataset.splits["test"]) == 1
    path.write_text("image,caption\n" + "".join(f"images/{p.name},something\n" for p in (tiny_flickr8k / "images").iterdir()))
    dataset = load_csv(path, tiny_flickr8k)
    assert sum(len(v) for v in dataset.splits.values()) == 24
    assert load_csv(path, tiny_flickr8k).splits == dataset.splits  # deterministic
    path.write_text("picture,text\nx.jpg,y\n")
    with pytest.raises(DatasetError, match="image,caption"):
        load_csv(path, tiny_flickr8k)


@pytest.mark.skipif(not SHARED_FLICKR8K.is_dir(), reason="needs the real Flickr8k in ../shared/data/flickr8k")
def test_real_flickr8k_standard_split_and_known_quirks():
    dataset = load_flickr8k(SHARED_FLICKR8K)
    sizes = [len(dataset.split(s)) for s in ("train", "dev", "test")]
    assert sizes == [6000, 1000, 1000]
    notes = "\n".join(dataset.notes)
    assert any("2258277193_586949ec62.jpg" in n and "no image file" in n for n in dataset.notes)
    assert "91 captioned images belong to no split" in notes
    assert "2851198725_37b6027625.jpg" in notes and "3050606344_af711c726c.jpg" in notes
    assert "LEAKAGE" not in notes
    train = {r.path.name for r in dataset.split("train")}
    assert not train & {r.path.name for r in dataset.split("test")}
