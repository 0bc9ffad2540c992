"""The model that ships in the repo: loads with no arguments, captions photos it has never seen."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.inference import DEFAULT_CHECKPOINT, EXAMPLES_DIR
from captioner.webapp import COMPARE
from conftest import REPO, SHARED_FLICKR8K, free_port

SHARED_COCO_OOD = SHARED_FLICKR8K.parent / "coco-ood-dev"

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped model yet")


def test_shipped_model_is_small_and_self_describing():
    assert DEFAULT_CHECKPOINT.stat().st_size < 40e6  # three cells and the tag decoder, in fp16
    payload = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert payload["config"]["encoder"]["name"] == "efficientnet_lite0"
    assert payload["provenance"]["dataset"] == "flickr8k" and "training" not in payload


def test_default_captioner_describes_example_photos_differently():
    captioner = Captioner.from_checkpoint()
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    captions = [c.text for c in captioner.caption(photos, beam_size=3)]
    assert all(len(c.split()) >= 3 for c in captions)
    assert len(set(captions)) == len(captions), captions  # not the same caption for every image


def test_shipped_model_holds_three_cells_and_each_writes_its_own_captions(capsys):
    """`captioner caption PHOTOS --cell X` for each cell: the cells' captions differ where the cells differ."""
    assert sorted(Captioner.from_checkpoint().cells) == ["gru", "lstm", "rnn"]
    # Routing off, so that every photo keeps its photo decoder's caption (the tag decoder writes the same for all).
    photo_decoder_only = [arg for key in ("unsure_below", "unseen_dog_below", "unseen_person_below")
                          for arg in ("--set", f"routing.{key}=0")]
    by_cell = {}
    for cell in ("rnn", "lstm", "gru"):
        assert main(["caption", str(EXAMPLES_DIR), "--cell", cell, "--no-progress", *photo_decoder_only]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == len(list(EXAMPLES_DIR.glob("*.jpg"))) and all("\t" in line for line in lines)
        by_cell[cell] = lines
    assert len({tuple(lines) for lines in by_cell.values()}) == 3, by_cell


def test_a_photo_alone_gets_the_caption_it_gets_in_a_batch():
    # One photo takes its own beam search (search._one_image_search), a batch the batched one; the fallback
    # decoder writes the unsure photos' captions on both paths too.
    captioner = Captioner.from_checkpoint()
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    batched = captioner.caption(photos, n_best=2)
    assert any(c.from_tags for c, _ in batched) and not all(c.from_tags for c, _ in batched)
    for photo, together in zip(photos, batched):
        alone = captioner.caption(photo, n_best=2)
        assert [c.text for c in alone] == [c.text for c in together]
        assert [c.score for c in alone] == pytest.approx([c.score for c in together], abs=1e-4)


def test_caption_command_without_checkpoint_uses_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "examples.jsonl"
    assert main(["caption", str(EXAMPLES_DIR), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(list(EXAMPLES_DIR.glob("*.jpg"))) and all(r["caption"] for r in rows)


@pytest.mark.skipif(not SHARED_FLICKR8K.is_dir(), reason="needs the real Flickr8k in ../shared/data/flickr8k")
def test_shipped_model_keeps_its_published_flickr8k_test_scores(tmp_path, capsys):
    """README and model card: test BLEU-4 0.232 and BLEU-1 0.670 at beam 3 (the target: 0.23 and 0.65)."""
    # The data root as the repo's feature cache knows it (relative to the repo), so a warm cache is reused;
    # features are cached in the repo's .cache/features, not in the working directory.
    root = os.path.relpath(SHARED_FLICKR8K)
    out = tmp_path / "test.jsonl"
    assert main(["evaluate", "--split", "test", "--beam-size", "3", "--set", f"data.root={root}",
                 "--set", f"train.cache_dir={REPO / '.cache' / 'features'}", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 1000 and result["beam_size"] == 3
    assert result["bleu4"] >= 0.23 and result["bleu1"] >= 0.65, result
    captions = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    assert len(set(captions)) > 300  # varied captions, not one sentence for all
    # Self-critical training can teach a model to stop mid-phrase ("a dog is running on the"); this one must not.
    cut_short = [c for c in captions if c.split()[-1] in {"a", "an", "the", "in", "on", "of", "with", "at"}]
    assert len(cut_short) <= 0.02 * len(captions), cut_short


def test_shipped_model_says_when_it_is_unsure_and_names_what_it_sees():
    cat, astronaut = Captioner.from_checkpoint().caption([EXAMPLES_DIR / "cat.jpg", EXAMPLES_DIR / "astronaut.jpg"])
    assert cat.tags[0][0] == "cat" and cat.unsure and cat.from_tags and "cat" in cat.text.split(), cat
    assert not astronaut.unsure and not astronaut.from_tags and astronaut.confidence > 0.05


@pytest.mark.skipif(not SHARED_COCO_OOD.is_dir(), reason="needs ../shared/data/coco-ood-dev")
def test_shipped_model_on_everyday_photos_keeps_its_published_dev_scores(capsys):
    """The numbers README and model card publish for coco-ood-dev (a dev set: they were chosen on it)."""
    assert main(["evaluate", "--data", str(SHARED_COCO_OOD), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 149 and result["images_without_person_dog"] == 76
    assert result["person_dog_hallucination"] <= 0.35 and result["cider_d"] >= 0.40, result
    assert result["without_person_dog"]["cider_d"] >= 0.30, result


def test_python_app_py_serves_the_shipped_model(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from gradio_client import Client, handle_file

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, str(repo / "app.py"), "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"app.py did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        photo = [handle_file(str(EXAMPLES_DIR / "astronaut.jpg"))]
        gallery, table = client.predict(photo, "beam", 3, 20, 0.0, 3, 2, api_name="/caption")
        assert len(gallery) == 1 and len(gallery[0]["caption"].split()) >= 3
        assert [row[1] for row in table["data"]] == [1, 2]
        gallery, _ = client.predict(photo, "beam", 3, 20, 0.0, 3, 1, COMPARE, api_name="/caption")
        assert [line.split(" ")[0] for line in gallery[0]["caption"].splitlines()] == ["gru", "lstm", "rnn"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_wheel_of_the_package_ships_the_model_files(tmp_path):
    """`pip install .` (not only -e) gets the model with its three cells, its card and the example photos."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", reason="builds the wheel without network, with the installed setuptools")
    source = tmp_path / "source"
    shutil.copytree(REPO / "captioner", source / "captioner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("captioner-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {info.filename: info.file_size for info in archive.infolist()}
    assert shipped["captioner/models/default.pt"] == DEFAULT_CHECKPOINT.stat().st_size
    assert "captioner/models/MODEL_CARD.md" in shipped and "captioner/concept_words.tsv" in shipped
    assert {f"captioner/examples/{p.name}" for p in EXAMPLES_DIR.glob("*.jpg")} <= set(shipped)
