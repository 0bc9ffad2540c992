"""Encoders: the offline default with its shipped weights, torchvision models from a weights file."""
from __future__ import annotations

import pytest
import torch
import torchvision

from captioner.encoder import ENCODERS, Encoder, EncoderError
from captioner.features import cached_features
from captioner.onnx_runtime import build_encoder


def test_default_encoder_works_offline_and_is_frozen():
    encoder = build_encoder("efficientnet_lite0", "default", image_size=64)
    pooled, grid = encoder(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 1280) and grid.shape[:2] == (2, 1280) and grid.dim() == 4
    assert torch.allclose(pooled, grid.mean(dim=(2, 3)))
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.backbone.training  # batch-norm statistics stay frozen
    assert encoder.fingerprint() == Encoder("efficientnet_lite0", "default", 64).fingerprint()
    assert encoder.fingerprint() != Encoder("efficientnet_lite0", "none", 64).fingerprint()


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large"])
def test_torchvision_encoder_from_a_weights_file(tmp_path, name):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights=None).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    encoder = build_encoder(name, str(path), image_size=64)
    pooled, grid = encoder(torch.randn(1, 3, 64, 64))
    assert pooled.shape == (1, ENCODERS[name].feature_dim)
    assert encoder.transform.mean == (0.485, 0.456, 0.406)
    assert torch.equal(next(encoder.backbone.parameters()), next(reference.parameters()))  # the stem conv


def test_encoder_errors_name_the_problem(tmp_path):
    with pytest.raises(EncoderError, match="unknown encoder 'vgg99'"):
        Encoder("vgg99")
    with pytest.raises(EncoderError, match="not found"):
        Encoder("resnet50", str(tmp_path / "absent.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(EncoderError, match="do not fit"):
        Encoder("resnet50", str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EncoderError, match="junk.pth"):
        Encoder("resnet50", str(junk))


def test_features_are_cached_in_fp16_and_bad_files_recorded(tiny_flickr8k, tmp_path, monkeypatch):
    encoder = build_encoder("efficientnet_lite0", "default", image_size=64)
    paths = sorted((tiny_flickr8k / "images").glob("*.jpg"))[:5]
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    table = cached_features(encoder, [*paths, bad], tmp_path / "cache", batch_size=2, num_workers=0, progress=False)
    assert table.features.dtype == torch.float16 and table.features.shape == (6, 1280)
    assert list(table.failed) == [str(bad)] and "not an image" in table.failed[str(bad)]
    direct = encoder(torch.stack([encoder.transform.load(paths[0])]))[0]
    assert torch.allclose(table.lookup([paths[0]]).float(), direct, atol=1e-2, rtol=1e-2)

    import captioner.features as features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("cache was not used"))
    again = cached_features(encoder, [bad, *paths], tmp_path / "cache", progress=False)
    assert torch.equal(again.features, table.features)
