import subprocess
import sys
from pathlib import Path

import pytest

from captioner.config import Config, ConfigError, load_config, upgraded, with_settings

REPO_CONFIG = "configs/flickr8k.yaml"


def test_shipped_config_loads_and_overrides_apply():
    config = load_config(REPO_CONFIG, ["decoder.cell=gru", "train.epochs=2", "train.lr=1e-3"])
    assert config.decoder.cell == "gru"
    assert config.train.epochs == 2 and config.train.lr == pytest.approx(1e-3)
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_repo_config_loads(path):
    config = load_config(path)
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_cell_is_accepted(cell):
    assert load_config(None, [f"decoder.cell={cell}"]).decoder.cell == cell


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("decoder:\n  hiden_dim: 256\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'decoder\.hiden_dim'"):
        load_config(path)


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be int"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("decoder.cell=transformer", "decoder.cell must be lstm, gru or rnn"),
    ("decoder.dropout=1.5", "dropout"),
    ("decode.beam_size=0", "beam_size"),
    ("train.epochs=true", "must be int"),
    ("train.reward_bleu_weight=-1", "reward_bleu_weight must be >= 0"),
    ("routing.unseen_person_below=2", r"routing.unseen_person_below must be in \[0, 1\]"),
    ("routing.people_sure_above=-0.1", r"routing.people_sure_above must be in \[0, 1\]"),
    ("routing.unsure_below=1.5", r"routing.unsure_below must be in \[0, 1\]"),
    ("nonsense", "expected section.key=value"),
    ("model.size=3", "unknown key 'model'"),
])
def test_bad_values_are_refused_with_a_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_routing_settings_stored_under_decode_by_older_checkpoints_load_into_their_own_section():
    values = Config().to_dict()
    del values["routing"]
    values["decode"].update(unsure_below=0.2, people_sure_above=0.9)
    config = Config.from_dict(upgraded(values))
    assert config.routing.unsure_below == 0.2 and config.routing.people_sure_above == 0.9
    assert config.routing.unseen_dog_below == Config().routing.unseen_dog_below
    assert "unsure_below" not in config.to_dict()["decode"]


def test_settings_change_a_trained_models_config_but_not_what_describes_the_model():
    config = with_settings(Config(), ["routing.unsure_below=0.1", "decode.beam_size=5", "encoder.runtime=torch"],
                           "model.pt")
    assert (config.routing.unsure_below, config.decode.beam_size, config.encoder.runtime) == (0.1, 5, "torch")
    for setting in ("decoder.cell=gru", "encoder.name=resnet18", "encoder.image_size=320"):
        with pytest.raises(ConfigError, match="describes the trained model"):
            with_settings(Config(), [setting], "model.pt")
    with pytest.raises(ConfigError, match="routing.unsure_below must be in"):
        with_settings(Config(), ["routing.unsure_below=2"], "model.pt")


def test_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_help_and_argument_errors_answer_without_importing_torch():
    # torch takes seconds to import: `captioner --help` and a mistyped command must not wait for it.
    script = ("import sys, contextlib, io\nfrom captioner.cli import main\n"
              "for argv in (['--help'], ['caption']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
              "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
              "print('torch' in sys.modules)\nfrom captioner import Captioner\nprint(Captioner.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "Captioner"]
