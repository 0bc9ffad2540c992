"""Visual concepts (tags) and confidence: the map file, the encoder's head, and what every caption carries."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from captioner.cli import main
from captioner.concepts import CONCEPT_WORDS_FILE, ConceptWords, default_concept_words
from captioner.confidence import DomainProfile, PersonProbe, kmeans
from captioner.onnx_runtime import build_encoder
from captioner.caption import caption_row
from captioner.describe import Caption
from captioner.inference import Captioner

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "captioner" / "examples"


def class_words() -> dict[str, str]:
    with open(CONCEPT_WORDS_FILE, encoding="utf-8") as handle:
        return {row["imagenet_class"]: row["word"] for row in csv.DictReader(handle, delimiter="\t")}


def test_the_map_names_imagenet_classes_in_the_heads_order_with_caption_words():
    with open(CONCEPT_WORDS_FILE, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["imagenet_class"] for r in rows] == torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]
    words = class_words()
    assert words["Egyptian cat"] == words["tabby"] == "cat"
    assert words["espresso"] == "coffee" and words["refrigerator"] in ("refrigerator", "fridge")
    assert words["airliner"] in ("airplane", "plane") and words["school bus"] == "bus"
    dog_breeds = [r for r in rows if 151 <= int(r["index"]) <= 268]
    assert len(dog_breeds) == 118 and {r["word"] for r in dog_breeds} == {"dog"}
    assert words["hotdog"] == "hot dog"  # food, not a dog
    assert words["CD player"] != "player" and words["Gila monster"] != "monster"
    assert all(w == w.lower() and w.strip() == w for w in words.values())


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "coco-text").is_dir(),
                    reason="needs ../shared/data (coco-text and flickr8k captions) to rebuild the map")
def test_the_script_rebuilds_the_committed_map(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from build_concept_words import build

    data = REPO.parent / "shared" / "data"
    build([data / "coco-text" / "captions.tsv", data / "flickr8k" / "Flickr8k.token.txt"], tmp_path / "words.tsv")
    assert (tmp_path / "words.tsv").read_text() == CONCEPT_WORDS_FILE.read_text()


def test_word_probabilities_sum_the_classes_of_a_word():
    concepts = ConceptWords(["dog", "dog", "cat", ""])
    probs = torch.tensor([[0.3, 0.3, 0.1, 0.3], [0.0, 0.0, 0.9, 0.1]])
    assert concepts.words == ["cat", "dog"]
    assert torch.allclose(concepts.word_probabilities(probs), torch.tensor([[0.1, 0.6], [0.9, 0.0]]))
    assert concepts.tags(probs) == [[("dog", 0.6), ("cat", 0.1)], [("cat", 0.9)]]
    with pytest.raises(ValueError, match="3 class probabilities for a map of 4"):
        concepts.word_probabilities(torch.zeros(1, 3))


def test_the_encoder_head_names_the_example_photos():
    encoder = build_encoder()
    paths = [EXAMPLES / "cat.jpg", EXAMPLES / "coffee.jpg"]
    pooled, _ = encoder(torch.stack([encoder.transform.load(p) for p in paths]))
    probs = encoder.classify(pooled)
    assert probs.shape == (2, 1000) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-4)
    cat, coffee = default_concept_words().tags(probs)
    assert cat[0][0] == "cat" and cat[0][1] > 0.5
    assert coffee[0][0] == "coffee" and coffee[0][1] > 0.5


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    points = torch.nn.functional.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 16), dim=1)
    found = kmeans(points, 3)
    assert (found @ centres.T).max(0).values.min() > 0.98  # every true centre has a centroid next to it


def test_familiarity_is_a_percentile_of_held_out_photos():
    torch.manual_seed(0)
    home = torch.randn(1, 32)
    train = home + 0.3 * torch.randn(400, 32)
    dev = home + 0.3 * torch.randn(200, 32)
    profile = DomainProfile.fit(train, dev, k=8)
    dev_familiarity = profile.familiarity(dev)
    assert dev_familiarity.min() > 0 and dev_familiarity.max() == 1.0
    assert abs(float((dev_familiarity < 0.05).float().mean()) - 0.05) < 0.01  # 5% of held-out photos are "unsure"
    stranger = profile.familiarity(torch.randn(20, 32))
    assert float(stranger.max()) < 0.05
    restored = DomainProfile.from_dict(profile.to_dict())
    assert torch.allclose(restored.familiarity(dev), dev_familiarity, atol=0.02)


def test_the_person_probe_learns_from_the_references_which_photos_show_people():
    torch.manual_seed(0)
    people, no_people = torch.randn(1, 32) + 3, torch.randn(1, 32) + 3  # pooled CNN features sit far from 0
    train = torch.cat([people + 0.5 * torch.randn(150, 32), no_people + 0.5 * torch.randn(100, 32),
                       torch.randn(30, 32) + 3])
    # shares of references naming a person; the 30 photos in between (1 of 5) are left out of the fit
    share = torch.cat([torch.full((150,), 0.8), torch.zeros(100), torch.full((30,), 0.2)])
    dev = torch.randn(50, 32) + 3
    profile = DomainProfile.fit(train, dev, k=4, person_share=share)
    new_people, new_empty = people + 0.5 * torch.randn(20, 32), no_people + 0.5 * torch.randn(20, 32)
    assert profile.person.probability(new_people).min() > 0.9
    assert profile.person.probability(new_empty).max() < 0.1
    restored = DomainProfile.from_dict(profile.to_dict())  # what a checkpoint keeps
    assert torch.allclose(restored.person.probability(new_people), profile.person.probability(new_people))
    rescaled = PersonProbe.fit(train * 4 + 10, share)  # another encoder's scale: the same probabilities
    between = (new_people + new_empty) / 2
    assert torch.allclose(rescaled.probability(between * 4 + 10), profile.person.probability(between), atol=1e-3)
    assert PersonProbe.fit(train, torch.ones(len(train))) is None  # nothing to tell apart: no probe
    with torch.inference_mode():  # as a caller's evaluation code may run it
        assert torch.allclose(PersonProbe.fit(train, share).probability(between), profile.person.probability(between))
    assert DomainProfile.from_dict(DomainProfile.fit(train, dev, k=4).to_dict()).person is None


def test_the_person_probe_learns_from_each_photos_share_of_references_naming_a_person():
    from captioner.data import ImageRecord
    from captioner.train import person_share

    records = [ImageRecord(Path("a.jpg"), ["A man rides a bike .", "a bike", "Two women walk .", "a hot dog"]),
               ImageRecord(Path("b.jpg"), ["a cat on a mat"])]
    assert person_share(records).tolist() == [0.5, 0.0]


def test_a_model_trained_on_photos_without_people_has_no_person_probe(trained):
    _, run = trained  # drawn shapes: no reference names a person
    payload = torch.load(run / "best.pt", weights_only=True)
    assert "centroids" in payload["domain"] and "person_weight" not in payload["domain"]
    assert Captioner.from_checkpoint(run / "best.pt").writer.domain.person is None


def test_caption_rows_carry_tags_and_confidence(trained, tiny_flickr8k, tmp_path, capsys):
    _, run = trained
    folder = tiny_flickr8k / "images"
    jsonl, table = tmp_path / "captions.jsonl", tmp_path / "captions.csv"
    for out in (jsonl, table):
        assert main(["caption", str(folder / "red_circle_2.jpg"), str(EXAMPLES / "cat.jpg"), "--checkpoint",
                     str(run / "best.pt"), "--out", str(out), "--no-progress"]) == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, jsonl.read_text().splitlines())}
    cat = rows["cat.jpg"]
    assert cat["tags"][0][0] == "cat" and 0.5 < cat["tags"][0][1] <= 1
    assert 0 <= cat["confidence"] <= 1 and cat["unsure"] is True  # a cat is nothing like drawn shapes
    assert rows["red_circle_2.jpg"]["confidence"] > cat["confidence"]
    with open(table, newline="") as handle:
        csv_rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert csv_rows["cat.jpg"]["tags"].startswith("cat ") and csv_rows["cat.jpg"]["unsure"] == "True"
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--checkpoint", str(run / "best.pt"), "--no-progress"]) == 0
    assert "[unsure; the photo shows: cat " in capsys.readouterr().out  # no fallback here: from the photo
    assert cat["from_tags"] is False and csv_rows["cat.jpg"]["from_tags"] == "False"


def test_a_row_says_unsure_and_from_tags_even_without_a_confidence():
    # A model with a fallback but no familiarity profile: its dog and person checks still route captions.
    routed = Caption("a cat on a bed", -1.0, True, tags=[("cat", 0.9)], confidence=None, unsure=True, from_tags=True)
    row = caption_row("cat.jpg", routed)
    assert row["unsure"] is True and row["from_tags"] is True and "confidence" not in row
    plain = caption_row("cat.jpg", Caption("a cat", -1.0, True, tags=[("cat", 0.9)]))
    assert plain["unsure"] is False and plain["from_tags"] is False


def test_every_ranked_caption_carries_its_photos_tags(trained):
    _, run = trained
    captioner = Captioner.from_checkpoint(run / "best.pt")
    single = captioner.caption(str(EXAMPLES / "cat.jpg"))
    assert single.tags[0][0] == "cat" and single.confidence is not None
    ranked = captioner.caption([str(EXAMPLES / "cat.jpg")], n_best=2, beam_size=2)[0]
    assert all(c.tags == single.tags and c.confidence == single.confidence for c in ranked)


def test_a_checkpoint_without_a_profile_has_no_confidence_and_export_can_fit_one(trained, tmp_path):
    config_path, run = trained
    bare = tmp_path / "bare.pt"
    payload = torch.load(run / "best.pt", weights_only=True)
    assert "domain" in payload  # training writes the profile
    del payload["domain"]
    torch.save(payload, bare)
    caption = Captioner.from_checkpoint(bare).caption(str(EXAMPLES / "cat.jpg"))
    assert caption.confidence is None and not caption.unsure and caption.tags
    fitted = tmp_path / "fitted.pt"
    assert main(["export", str(bare), str(fitted), "--fit-confidence"]) == 0
    assert Captioner.from_checkpoint(fitted).caption(str(EXAMPLES / "cat.jpg")).unsure
