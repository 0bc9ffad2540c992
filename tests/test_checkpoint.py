"""The checkpoint format: loads safely with weights_only=True; damaged or foreign files are named."""
from __future__ import annotations

import pickle

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint, load_domain, save_checkpoint
from captioner.config import Config
from captioner.decoder import CaptionDecoder
from captioner.text import Vocabulary

ENCODER_INFO = {"name": "efficientnet_lite0", "weights": "default", "fingerprint": "abc", "feature_dim": 16}


@pytest.fixture
def checkpoint(tmp_path):
    config = Config.from_dict({"decoder": {"cell": "gru", "embed_dim": 8, "hidden_dim": 12}})
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"])
    decoder = CaptionDecoder(len(vocab), 16, config.decoder)
    path = tmp_path / "model.pt"
    save_checkpoint(path, config, vocab, decoder, ENCODER_INFO, {"dataset": "tiny", "epoch": 3})
    return path, decoder


def test_round_trip_with_weights_only(checkpoint):
    path, decoder = checkpoint
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "captioner" and raw["vocab"][4:] == ["a", "dog"]
    assert raw["config"]["decoder"]["cell"] == "gru" and raw["provenance"]["epoch"] == 3
    config, vocab, loaded, _ = load_checkpoint(path)
    assert config.decoder.cell == "gru" and len(vocab) == 6
    for key, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_half_precision_checkpoint_loads_as_float(tmp_path, checkpoint):
    path, decoder = checkpoint
    config, vocab, _, _ = load_checkpoint(path)
    half = tmp_path / "half.pt"
    save_checkpoint(half, config, vocab, decoder, ENCODER_INFO, {}, half=True)
    assert half.stat().st_size < path.stat().st_size
    _, _, loaded, _ = load_checkpoint(half)
    assert loaded.out.weight.dtype == torch.float32


def test_random_file_truncated_file_and_missing_file(tmp_path, checkpoint):
    path, _ = checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")
    notes = tmp_path / "README.md"  # a text file is no checkpoint, not "Python objects that could run code"
    notes.write_text("# notes\n")
    with pytest.raises(CheckpointError, match="README.md: not a readable checkpoint"):
        load_checkpoint(notes)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "captioner", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="plain.pkl"):
        load_checkpoint(plain)


def test_other_torch_file_and_mismatched_vocabulary(tmp_path, checkpoint):
    path, _ = checkpoint
    other = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(other)
    raw = torch.load(path, weights_only=True)
    raw["vocab"] = raw["vocab"] + ["extra"]
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_a_familiarity_profile_or_person_probe_that_does_not_fit_the_features_is_named(tmp_path, checkpoint):
    path, _ = checkpoint
    raw = torch.load(path, weights_only=True)
    fits = {"centroids": torch.randn(4, 16), "dev_similarity": torch.rand(10).sort().values,
            "person_weight": torch.randn(16), "person_bias": torch.tensor(0.5)}
    assert load_domain({**raw, "domain": fits}, path).person is not None
    with pytest.raises(CheckpointError, match="model.pt: its 'domain' person_weight has 12 values per photo, but "
                                              "its encoder's features have 16"):
        load_domain({**raw, "domain": {**fits, "person_weight": torch.randn(12)}}, path)
    with pytest.raises(CheckpointError, match="'domain' centroids has 8 values"):
        load_domain({**raw, "domain": {**fits, "centroids": torch.randn(4, 8)}}, path)
    with pytest.raises(CheckpointError, match="bad familiarity profile"):
        load_domain({**raw, "domain": {"centroids": torch.randn(4, 16)}}, path)


def test_export_stores_settings_but_cannot_change_what_describes_the_model(tmp_path, checkpoint):
    from captioner.checkpoint import export_checkpoint
    from captioner.config import ConfigError

    checkpoint, _ = checkpoint
    settings = ["data.root=data/flickr8k", "routing.unsure_below=0.1"]
    provenance = export_checkpoint(checkpoint, tmp_path / "out.pt", settings=settings)
    config, _, _, _ = load_checkpoint(tmp_path / "out.pt")
    assert config.data.root == "data/flickr8k" and config.routing.unsure_below == 0.1
    assert provenance["settings"] == settings
    with pytest.raises(ConfigError, match="describes the trained model"):
        export_checkpoint(checkpoint, tmp_path / "bad.pt", settings=["decoder.hidden_dim=64"])
    assert not (tmp_path / "bad.pt").exists()


def test_the_shipped_model_looks_for_its_data_where_the_readme_puts_it():
    from captioner.inference import DEFAULT_CHECKPOINT

    config, _, _, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    assert config.data.root == "data/flickr8k"  # `captioner evaluate --split test` needs no --set
