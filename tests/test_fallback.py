"""The fallback decoder: tags from caption words, the person probe, training on text alone, routing unsure photos."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.cli import main
from captioner.concepts import ConceptWords, default_concept_words
from captioner.fallback import CaptionConcepts, caption_tag_vector, singular
from captioner.inference import Captioner

EXAMPLES = Path(__file__).resolve().parents[1] / "captioner" / "examples"


def test_caption_words_name_concepts_in_any_number_and_two_word_names():
    concepts = default_concept_words()
    named = CaptionConcepts(concepts)
    words = lambda caption: {concepts.words[i] for i in named(caption.split())}  # noqa: E731
    assert words("two dogs chase a cat") == {"dog", "cat"}
    assert words("a hot dog on a plate") == {"hot dog", "plate"}
    assert words("a teddy bear on some benches") >= {"teddy bear", "bench"}
    assert singular("puppies") == "puppy" and singular("glass") == "glass" and singular("bus") == "bus"


def test_a_captions_tag_vector_looks_like_a_classifiers():
    rng, frequency = random.Random(0), torch.ones(10)
    vectors = torch.stack([caption_tag_vector({2, 5}, 10, frequency, rng) for _ in range(2000)])
    kept = (vectors[:, [2, 5]] > 0).float().mean()
    assert 0.75 < kept < 0.85  # the classifier misses about one object in five
    assert vectors.sum(1).max() <= 1 + 1e-6  # word probabilities of one softmax
    others = vectors[:, [0, 1, 3, 4, 6, 7, 8, 9]]
    assert 0.2 < (others > 0).any(1).float().mean() < 0.6 and others.max() <= 0.6  # a few weak wrong tags


def test_train_a_fallback_export_it_and_unsure_photos_are_captioned_from_tags(trained, tiny_flickr8k, tmp_path):
    _, run = trained
    captions = tmp_path / "captions.tsv"
    lines = ["coco_id\tsource\tcaption"] + [f"{i}\ttest\t{text}" for i in range(40) for text in (
        "A cat sitting on a couch .", "A cup of coffee on a table .", "A cat lying on a bed .",
        "Coffee in a white cup .", "Something is happening here .")]
    captions.write_text("\n".join(lines) + "\n")
    assert main(["train-fallback", "--captions", str(captions), "--out",
                 str(tmp_path / "fallback"), "--for-model", str(run / "best.pt"), "--epochs", "40", "--no-progress"]) == 0
    config, vocab, decoder, _ = load_checkpoint(tmp_path / "fallback" / "best.pt")
    assert config.decoder.inputs == "tags" and "coffee" in vocab.words
    assert "happening" not in vocab.words  # a caption that names no concept teaches nothing about tags: left out

    model = tmp_path / "with-fallback.pt"
    assert main(["export", str(run / "best.pt"), str(model), "--fallback", str(tmp_path / "fallback" / "best.pt")]) == 0
    captioner = Captioner.from_checkpoint(model)
    cat, circle = captioner.caption([str(EXAMPLES / "cat.jpg"), str(tiny_flickr8k / "images" / "red_circle_2.jpg")])
    assert cat.unsure and cat.from_tags and "cat" in cat.text.split()
    assert not circle.unsure and not circle.from_tags and "circle" in circle.text.split()
    plain = Captioner.from_checkpoint(run / "best.pt").caption(str(EXAMPLES / "cat.jpg"))
    assert plain.unsure and not plain.from_tags  # without a fallback the photo's caption stays, marked unsure


def test_export_refuses_a_fallback_that_is_not_one(trained, tmp_path):
    _, run = trained
    with pytest.raises(CheckpointError, match="not a fallback decoder"):
        from captioner.checkpoint import export_checkpoint

        export_checkpoint(run / "best.pt", tmp_path / "x.pt", fallback=run / "best.pt")
