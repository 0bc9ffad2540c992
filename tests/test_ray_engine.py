"""`captioner caption --engine ray`: the local engine's rows, errors, exit codes and resume, on a local Ray instance."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import pytest

from captioner.caption import collect_images, printable
from captioner.cli import main
from captioner.ray_engine import table_rows

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own settings
needs_ray = pytest.mark.skipif(ray is None, reason="ray[data] is not installed (pip install -e .[scale])")


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray instance for the module; the engine reuses it instead of starting its own.

    address="local": a new instance of this test's own, even where RAY_ADDRESS is set or a `ray start` cluster
    runs on this machine (/tmp/ray/ray_current_cluster), which ray.init() would join instead."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def awkward_folder(tiny_flickr8k, tmp_path_factory):
    """Two good images (one with a non-UTF-8 name), a corrupt .jpg, a text file named .jpg, a skipped .txt."""
    folder = tmp_path_factory.mktemp("awkward")
    images = tiny_flickr8k / "images"
    shutil.copy(images / "red_circle_2.jpg", folder / "a_red.jpg")
    shutil.copy(images / "blue_square_2.jpg", os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))
    (folder / "b_corrupt.jpg").write_bytes((images / "green_circle_2.jpg").read_bytes()[:300])
    (folder / "c_text.jpg").write_text("just some words\n")
    (folder / "notes.txt").write_text("not an image, not named like one")
    return folder


def read(path):
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(rows, expected):
    """Equal rows, but scores only to 1e-3: actors run torch on one thread, and thread counts change float sums."""
    assert [{k: v for k, v in r.items() if k != "score"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "score"} for r in expected]
    assert [float(r.get("score", 0)) for r in rows] == pytest.approx([float(r.get("score", 0)) for r in expected],
                                                                     abs=1e-3)


def caption(folder, checkpoint, out, *extra):
    return main(["caption", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "2",
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def local_rows(trained, awkward_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "captions.jsonl"
    assert caption(awkward_folder, trained[1] / "best.pt", out) == 3
    return read(out)


@needs_ray
def test_ray_gives_the_local_rows_in_the_same_order(trained, awkward_folder, local_rows, ray_instance, tmp_path,
                                                    capsys):
    out = tmp_path / "captions.jsonl"
    assert caption(awkward_folder, trained[1] / "best.pt", out, "--engine", "ray") == 3
    rows = read(out)
    by_path = {r["path"]: r for r in local_rows}
    assert_same_rows(rows, [by_path[printable(p)] for p in collect_images([str(awkward_folder)])[0]])
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"b_corrupt.jpg", "c_text.jpg"}
    assert "corrupt or truncated" in errors["b_corrupt.jpg"] and "not an image" in errors["c_text.jpg"]
    assert any(r["path"].endswith("caf\\xe9.jpg") and r["caption"] for r in rows)
    assert "captioned 2, failed 2, skipped 1 non-image files" in capsys.readouterr().err


@needs_ray
def test_ray_resumes_a_csv_file_like_the_local_engine(trained, awkward_folder, local_rows, ray_instance, tmp_path,
                                                      capsys):
    out = tmp_path / "captions.csv"
    good = next(r for r in local_rows if "caption" in r)
    out.write_text(f"path,caption,score,error\n{good['path']},{good['caption']},{good['score']},\n"
                   f"{awkward_folder}/c_te")  # as if killed mid-write
    assert caption(awkward_folder, trained[1] / "best.pt", out, "--engine", "ray") == 3
    assert "1 images already captioned" in capsys.readouterr().err
    rows = read(out)
    assert rows[0]["path"] == good["path"] and rows[0]["caption"] == good["caption"]
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in local_rows)


@needs_ray
def test_ray_writes_parquet_to_a_folder(trained, awkward_folder, local_rows, ray_instance, tmp_path, capsys):
    import pyarrow.parquet as parquet

    folder = tmp_path / "captions"
    assert caption(awkward_folder, trained[1] / "best.pt", f"{folder}/", "--engine", "ray") == 3
    table = parquet.read_table(folder)
    assert table.column_names == ["path", "caption", "score", "confidence", "unsure", "from_tags", "tags", "error"]
    rows = table_rows(table)
    assert_same_rows(sorted(rows, key=lambda r: r["path"]), sorted(local_rows, key=lambda r: r["path"]))
    assert "captioned 2, failed 2" in capsys.readouterr().err
    assert caption(awkward_folder, trained[1] / "best.pt", f"{folder}/", "--engine", "ray") == 1
    assert "not empty" in capsys.readouterr().err


def test_without_ray_the_error_says_what_to_install(awkward_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["caption", str(awkward_folder), "--engine", "ray"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("captioner: error:") and "pip install -e .[scale]" in err and err.count("\n") == 1


def test_ray_only_options_are_refused_by_the_local_engine(awkward_folder, tmp_path, capsys):
    assert main(["caption", str(awkward_folder), "--address", "127.0.0.1:6379"]) == 1
    assert "--address is for --engine ray" in capsys.readouterr().err
    assert main(["caption", str(awkward_folder), "--out", f"{tmp_path}/"]) == 1
    assert "needs --engine ray" in capsys.readouterr().err
