"""The GPU path: what a user with CUDA gets. Skipped without a GPU; run on a lent one (README, "Tests").

On a GPU the CNN and the decoders stay in PyTorch (ONNX Runtime serves CPUs only), every stage runs there,
and what comes out must match the CPU: the same captions, tags and confidence, checkpoints any machine loads.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from captioner import Captioner
from captioner.cli import main
from captioner.folders import caption_files
from captioner.inference import example_photos

from conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FIELDS = ("text", "unsure", "from_tags")


def described(captions) -> list[tuple]:
    return [tuple(getattr(c, f) for f in FIELDS) + (round(c.confidence, 2), [w for w, _ in c.tags]) for c in captions]


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. cuBLAS's "no current CUDA context" in the search thread
def test_the_shipped_model_on_a_gpu_stays_in_pytorch_and_writes_the_cpus_captions():
    gpu = Captioner.from_checkpoint(device="cuda")
    cpu = Captioner.from_checkpoint(device="cpu", runtime="torch")
    assert gpu.device.type == "cuda" and gpu.encoder.runtime_on(gpu.device) == "torch"
    assert gpu.writer.searched is gpu.decoder  # the steps too: no ONNX Runtime session on a GPU
    photos = example_photos()
    assert len(photos) >= 4
    # The examples include photos unlike Flickr8k's: unsure ones, captioned from their tags by the fallback.
    assert described(gpu.caption(photos, beam_size=3)) == described(cpu.caption(photos, beam_size=3))
    on_gpu = [c for _, c, _ in caption_files(gpu, photos, n_best=3, beam_size=5)]
    on_cpu = [c for _, c, _ in caption_files(cpu, photos, n_best=3, beam_size=5)]
    assert [[c.text for c in n] for n in on_gpu] == [[c.text for c in n] for n in on_cpu]
    assert any(c[0].from_tags for c in on_gpu), "no example went through the fallback decoder"


def test_caption_command_on_a_gpu_writes_the_cpus_rows_and_reports_bad_files(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for copy in range(18):  # over features.IN_PROCESS_UP_TO files: the GPU run decodes in worker processes
        for photo in example_photos():
            shutil.copy(photo, folder / f"{copy}-{photo.name}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows = {}
    for run, device in enumerate(("cuda", "cpu")):
        out = tmp_path / f"{run}.jsonl"
        assert main(["caption", str(folder), "--device", device, "--out", str(out), "--no-progress"]) == 3
        rows[device] = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "broken.jpg" in capsys.readouterr().err and rows["cuda"]["broken.jpg"]["error"]
    assert rows["cuda"].keys() == rows["cpu"].keys()
    for name, row in rows["cpu"].items():
        assert rows["cuda"][name].get("caption") == row.get("caption"), name
        assert rows["cuda"][name].get("score") == pytest.approx(row.get("score"), abs=0.01), name


def test_a_model_trained_on_a_gpu_loads_anywhere_and_resumes_on_the_gpu_or_a_cpu(tiny_flickr8k, tmp_path):
    config = tiny_config(tiny_flickr8k, tmp_path / "run", tmp_path / "cache", epochs=1, device="cuda")
    config_path = tmp_path / "gpu.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt"):
        payload = torch.load(run / name, weights_only=True)  # no map_location: a CPU-only machine's call
        assert {t.device.type for t in tensors_in(payload)} == {"cpu"}, name
    # The GPU's features are cached under PyTorch's key (the CPU's default runtime, ONNX Runtime, has its own).
    assert [p.name.rsplit("-", 2)[-2:] for p in (tmp_path / "cache").iterdir()] == [["torch", "fp32"]]
    for device, epochs in (("cuda", 2), ("cpu", 3)):  # the GPU run goes on, on the GPU, then on a CPU
        assert main(["train", "--config", str(config_path), "--resume", "--set", f"train.device={device}",
                     "--set", f"train.epochs={epochs}", "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    paths = sorted((tiny_flickr8k / "images").glob("*_2.jpg"))
    gpu = Captioner.from_checkpoint(run / "best.pt", device="cuda")
    cpu = Captioner.from_checkpoint(run / "best.pt", device="cpu")
    assert [c.text for c in gpu.caption(paths)] == [c.text for c in cpu.caption(paths)]
