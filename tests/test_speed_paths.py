"""The fast paths give the same answers: CNN in small chunks, beam search over gathered batches, worker
processes, the encoder's inference layout."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import captioner.features as features
from captioner import Captioner
from captioner.encoder import Encoder
from captioner.features import extract_features
from captioner.folders import caption_files, default_workers
from captioner.onnx_runtime import build_encoder


@pytest.fixture
def folder(tiny_flickr8k, tmp_path):
    """All 24 shapes plus a broken file in the middle of the order."""
    target = tmp_path / "photos"
    target.mkdir()
    images = sorted((tiny_flickr8k / "images").glob("*.jpg"))
    for i, image in enumerate(images):
        shutil.copy(image, target / f"{i:02d}_{image.name}")
    (target / "10_zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return sorted(str(p) for p in target.iterdir())


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("batch_size, workers", [(1, 0), (5, 0), (128, 0), (7, 1)])
def test_caption_files_equals_one_image_at_a_time(trained, folder, monkeypatch, beam_size, batch_size, workers):
    captioner = Captioner.from_checkpoint(trained[1] / "best.pt")
    if workers:
        monkeypatch.setattr(features, "IN_PROCESS_UP_TO", 0)  # a worker process even for this small folder
    got = {}
    for index, captions, error in caption_files(captioner, folder, batch_size, workers, n_best=2, beam_size=beam_size):
        assert index not in got
        got[index] = (captions, error)
    assert sorted(got) == list(range(len(folder)))
    for index, path in enumerate(folder):
        captions, error = got[index]
        if path.endswith("broken.jpg"):
            assert captions is None and "broken.jpg" in error
            continue
        alone = captioner.caption(path, n_best=2, beam_size=beam_size)
        assert [c.text for c in captions] == [c.text for c in alone], path
        assert [c.score for c in captions] == pytest.approx([c.score for c in alone], abs=1e-4)


def test_caption_of_a_list_equals_each_alone(trained, folder):
    captioner = Captioner.from_checkpoint(trained[1] / "best.pt")
    good = [p for p in folder if not p.endswith("broken.jpg")]
    together = captioner.caption(good, beam_size=3)
    assert [c.text for c in together] == [captioner.caption(p, beam_size=3).text for p in good]


def test_inference_layout_keeps_the_numbers(tiny_flickr8k):
    """Folded symmetric padding and in-place ReLU6 change no feature: same as the package's own model."""
    from efficientnet_lite_pytorch import EfficientNet

    encoder = Encoder("efficientnet_lite0", "default", image_size=224)  # no session attached: torch
    plain = EfficientNet.from_name("efficientnet-lite0")
    plain.load_state_dict(encoder.backbone.model.state_dict())
    plain = plain.eval().to(memory_format=torch.channels_last)
    assert any(isinstance(m, torch.nn.ZeroPad2d) for m in plain.modules())
    torch.manual_seed(0)
    images = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        ours = encoder(images)[1]
        reference = plain.extract_features(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)  # bitwise equal with oneDNN on x86


def test_feature_cache_numbers_do_not_depend_on_the_cnn_batch(tiny_flickr8k):
    encoder = build_encoder("efficientnet_lite0", "default", image_size=64)
    paths = sorted((tiny_flickr8k / "images").glob("*.jpg"))[:12]
    small, _ = extract_features(encoder, paths, batch_size=4, num_workers=0, progress=False)
    large, _ = extract_features(encoder, paths, batch_size=12, num_workers=0, progress=False)
    assert small.dtype == torch.float16
    assert torch.allclose(small.float(), large.float(), rtol=1e-3, atol=1e-3)  # fp16: equal up to rounding


def test_worker_processes_where_the_cnn_leaves_cpu_time_and_one_per_spare_core_on_a_gpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert default_workers(cpu) == 0  # torch's threads fill the CPU: decode in process
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_workers(cpu) == 1
    # On a GPU the decoding sets the pace: a process per spare core, up to 8.
    assert default_workers(gpu) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_workers(gpu) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers(gpu) == 1
