"""The fallback decoder: tags from caption words, the person probe, training on text alone, routing unsure photos."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.cli import main
from captioner.concepts import default_concept_words
from captioner.files import read_metrics
from captioner.fallback import CaptionConcepts, caption_tag_vector, singular
from captioner.inference import Captioner
from captioner.routing import mentions_person

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "captioner" / "examples"
NO_CHECKS = ("routing.unsure_below=0", "routing.unseen_dog_below=0", "routing.unseen_person_below=0")


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
    tagged = vectors.sum(1) > 0
    assert torch.allclose(vectors[tagged].sum(1), torch.ones(int(tagged.sum())))  # scaled as a photo's tags are
    others = vectors[:, [0, 1, 3, 4, 6, 7, 8, 9]]
    assert 0.2 < (others > 0).any(1).float().mean() < 0.6  # a few wrong tags...
    both_kept = (vectors[:, [2, 5]] > 0).all(1)
    assert others[both_kept].sum(1).mean() < 0.25 * vectors[both_kept][:, [2, 5]].sum(1).mean()  # ...and weak ones


def test_train_a_fallback_export_it_and_unsure_photos_are_captioned_from_tags(trained, tiny_flickr8k, tmp_path,
                                                                              capsys):
    _, run = trained
    captions = tmp_path / "captions.tsv"
    lines = ["coco_id\tsource\tcaption"] + [f"{i}\ttest\t{text}" for i in range(40) for text in (
        "A cat sitting on a couch .", "A cup of coffee on a table .", "A cat lying on a bed .",
        "Coffee in a white cup .", "Something is happening here .")]
    captions.write_text("\n".join(lines) + "\n")
    dev = tmp_path / "dev"  # photos unlike the training ones, to pick the epoch on: captioned from their tags
    (dev / "images").mkdir(parents=True)
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, dev / "images" / name)
    (dev / "refs.jsonl").write_text('{"image": "cat.jpg", "refs": ["a cat lying on a bed"]}\n'
                                    '{"image": "coffee.jpg", "refs": ["a cup of coffee on a table"]}\n')
    model_config = load_checkpoint(run / "best.pt")[0]
    assert main(["train", "--config", str(REPO / "configs" / "tag-decoder.yaml"), "--no-progress",
                 "--set", f"data.annotations={captions}", "--set", f"data.dev_folder={dev}", "--set", "train.epochs=12",
                 "--set", f"train.out_dir={tmp_path / 'fallback'}", "--set", "train.device=cpu",
                 "--set", f"encoder.image_size={model_config.encoder.image_size}",
                 "--set", f"encoder.runtime={model_config.encoder.runtime}", "--set", "train.warmup_steps=1"]) == 0
    config, vocab, decoder, payload = load_checkpoint(tmp_path / "fallback" / "best.pt")
    assert config.decoder.inputs == "tags" and "coffee" in vocab.words
    dev_scores = [row["dev_cider_d"] for row in read_metrics(tmp_path / "fallback")]  # the same loop as photos
    assert len(dev_scores) == 12 and payload["provenance"]["epoch"] == 1 + dev_scores.index(max(dev_scores))
    assert "happening" not in vocab.words  # a caption that names no concept teaches nothing about tags: left out

    model = tmp_path / "with-fallback.pt"
    assert main(["export", str(run / "best.pt"), str(model), "--fallback", str(tmp_path / "fallback" / "best.pt")]) == 0
    captioner = Captioner.from_checkpoint(model)
    cat, circle = captioner.caption([str(EXAMPLES / "cat.jpg"), str(tiny_flickr8k / "images" / "red_circle_2.jpg")])
    assert cat.unsure and cat.from_tags and "cat" in cat.text.split()
    assert not circle.unsure and not circle.from_tags and "circle" in circle.text.split()
    capsys.readouterr()
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--checkpoint", str(model), "--no-progress"]) == 0
    assert f"{cat.text}  [unsure, written from the tags: cat " in capsys.readouterr().out
    plain = Captioner.from_checkpoint(run / "best.pt").caption(str(EXAMPLES / "cat.jpg"))
    assert plain.unsure and not plain.from_tags  # without a fallback the photo's caption stays, marked unsure


def test_export_refuses_a_fallback_that_is_not_one(trained, tmp_path):
    _, run = trained
    with pytest.raises(CheckpointError, match="not a tag decoder"):
        from captioner.checkpoint import export_checkpoint

        export_checkpoint(run / "best.pt", tmp_path / "x.pt", fallback=run / "best.pt")


def test_words_the_fallback_never_learned_borrow_the_most_alike_sayable_word():
    from captioner.config import EncoderConfig
    from captioner.onnx_runtime import encoder_from_config
    from captioner.fallback import WordBorrowing
    from captioner.text import Vocabulary

    concepts = default_concept_words()
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "plane", "flying", "in", "the", "sky", "two",
                        "cat", "tiger", "vest"])
    borrowing = WordBorrowing(concepts, vocab, encoder_from_config(EncoderConfig()).class_weights())
    stand_ins = {concepts.words[word]: concepts.words[stand_in] for word, stand_in in borrowing.stand_in.items()}
    assert stand_ins["rocket"] == "plane" and stand_ins["lion"] == "tiger"  # by the CNN's own class weights
    assert "gun" not in stand_ins  # its nearest sayable word (vest) is no stand-in
    assert "cat" not in stand_ins and "plane" not in stand_ins  # sayable words speak for themselves

    rocket, plane = concepts.words.index("rocket"), concepts.words.index("plane")
    tags = torch.zeros(2, len(concepts.words))
    tags[0, rocket], tags[0, plane] = 0.18, 0.02  # a rocket photo
    tags[1, rocket], tags[1, plane] = 0.05, 0.60  # a plane photo with a weak rocket tag stays a plane
    vectors, renames = borrowing.lend(tags)
    assert vectors[0, plane] == pytest.approx(0.20) and vectors[0, rocket] == 0
    assert renames == [{"plane": "rocket"}, {}]
    assert borrowing.rename("a plane flying in the sky", renames[0]) == "a rocket flying in the sky"
    assert borrowing.rename("two planes in the sky", renames[0]) == "two rockets in the sky"


def test_a_caption_naming_a_dog_the_encoder_does_not_see_is_unsure_and_written_from_tags():
    captioner = Captioner.from_checkpoint()  # the shipped model, with its fallback
    coffee = str(EXAMPLES / "coffee.jpg")
    scene = captioner.with_settings("routing.unsure_below=0", "routing.unseen_dog_below=0").caption(coffee)
    assert "dog" in scene.text.split() and not scene.unsure  # Flickr8k's prior: "a brown dog is running..."
    checked = captioner.with_settings("routing.unsure_below=0").caption(coffee)
    assert checked.unsure and checked.from_tags
    assert "dog" not in checked.text.split() and {"coffee", "cup"} & set(checked.text.split())


def test_a_caption_naming_a_person_the_person_probe_does_not_see_is_unsure_and_written_from_tags():
    captioner = Captioner.from_checkpoint()  # the shipped model: its person probe gives the cat 0.2
    cat = str(EXAMPLES / "cat.jpg")
    scene = captioner.with_settings(*NO_CHECKS).caption(cat)
    assert mentions_person(scene.text.split()) and not scene.unsure  # Flickr8k's prior: "a little boy is ..."
    checked = captioner.with_settings("routing.unsure_below=0", "routing.unseen_dog_below=0").caption(cat)
    assert checked.unsure and checked.from_tags
    assert not mentions_person(checked.text.split()) and "cat" in checked.text.split()


def test_an_unfamiliar_photo_the_person_probe_is_sure_shows_people_keeps_the_flickr8k_decoders_caption():
    captioner = Captioner.from_checkpoint()
    astronaut = str(EXAMPLES / "astronaut.jpg")  # confidence 0.2; the probe: people, 1.0
    from_tags = captioner.with_settings("routing.unsure_below=0.5", "routing.people_sure_above=1").caption(astronaut)
    assert from_tags.unsure and from_tags.from_tags and not mentions_person(from_tags.text.split())
    kept = captioner.with_settings("routing.unsure_below=0.5").caption(astronaut)
    assert kept.unsure and not kept.from_tags and mentions_person(kept.text.split())
    assert kept.text == captioner.caption(astronaut).text


def test_an_unsure_photo_without_a_single_tag_keeps_the_caption_written_from_it(monkeypatch):
    captioner = Captioner.from_checkpoint()
    cat = str(EXAMPLES / "cat.jpg")
    assert captioner.caption(cat).from_tags
    # The encoder names nothing: the fallback would have only its favourite subject to write ("a large white
    # dog sitting on top of a wooden table", whatever the photo).
    monkeypatch.setattr(captioner.writer.concept_words, "top_tags", lambda words: [[] for _ in words])
    kept = captioner.caption(cat)
    assert kept.unsure and not kept.from_tags and kept.tags == []
    assert kept.text == captioner.with_settings(*NO_CHECKS).caption(cat).text
    checked = captioner.with_settings("routing.unsure_below=0", "routing.unseen_dog_below=0").caption(cat)  # the person check: the same
    assert checked.unsure and not checked.from_tags and checked.text == kept.text


def test_a_fallback_caption_writes_each_content_word_once_whatever_the_search():
    from captioner.fallback import OnceOnlyWords
    from captioner.search import beam_search, greedy_search
    from captioner.text import Vocabulary

    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "sink", "and", "toilet"])

    class Parrot:  # always: sink, then a, then and, then toilet, then <eos>
        def init_state(self, features):
            return torch.zeros(1, len(features), 1)

        def step(self, tokens, state):
            preference = torch.tensor([-9.0, -9.0, -4.0, -9.0, -2.0, -1.0, -3.0, -3.5])
            return torch.log_softmax(preference.repeat(len(tokens), 1), dim=1), state

    features = torch.zeros(2, 3)
    plain = greedy_search(Parrot(), features, max_length=6)[0].tokens
    assert vocab.decode(plain) == ["sink"] * 6
    once = OnceOnlyWords(Parrot(), vocab)
    for hypothesis in [greedy_search(once, features, max_length=6)[0], beam_search(once, features, beam_size=3, max_length=6)[0][0]]:
        words = vocab.decode(hypothesis.tokens)
        assert words.count("sink") <= 1 and words.count("toilet") <= 1
    assert vocab.decode(greedy_search(once, features, max_length=6)[0].tokens)[:3] == ["sink", "a", "a"]  # "a" may repeat
