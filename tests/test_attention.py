"""decoder.attention: the grid is cached, trained on, stored in the checkpoint's config, and used to caption."""
from __future__ import annotations

import json

import yaml

from captioner import Captioner
from captioner.cli import main
from captioner.folders import caption_files
from conftest import tiny_config


def test_attention_model_trains_evaluates_and_captions_what_it_sees(tiny_flickr8k, tmp_path, capsys):
    config = tiny_config(tiny_flickr8k, tmp_path / "run", tmp_path / "cache", epochs=15, batch_size=8)
    config.decoder.attention, config.decoder.attention_dim = True, 16
    config_path = tmp_path / "attention.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    assert any(p.name.endswith("-grid") for p in (tmp_path / "cache").iterdir())  # grid cells, not pooled vectors

    captioner = Captioner.from_checkpoint(tmp_path / "run" / "best.pt")
    assert captioner.decoder.uses_grid and captioner.config.decoder.attention
    colours = ("red", "green", "blue", "yellow")
    paths = [tiny_flickr8k / "images" / f"{c}_square_2.jpg" for c in colours]
    captions = captioner.caption(paths, beam_size=3)
    assert sum(c in caption.text for c, caption in zip(colours, captions)) >= 3, [c.text for c in captions]
    from_files = {i: c[0].text for i, c, _ in caption_files(captioner, paths, beam_size=3)}
    assert [from_files[i] for i in range(4)] == [c.text for c in captions]

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--split", "test",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and result["bleu1"] > 0.5
