"""The routing policy as a table of cases: which decoder writes a photo's caption, and whether it is unsure."""
from __future__ import annotations

import pytest
import torch

from captioner.concepts import ConceptWords
from captioner.config import RoutingConfig
from captioner.routing import PHOTO, TAGS, Route, Signals, batch_signals, mentions_dog, mentions_person, route

SETTINGS = RoutingConfig(unsure_below=0.05, unseen_dog_below=0.05, unseen_person_below=0.75, people_sure_above=0.999)
TAGGED = [("cat", 0.8)]


def signals(familiarity=0.5, person=0.5, dog=0.0, tags=TAGGED) -> Signals:
    return Signals(familiarity, person, dog, tags)


# (case, signals, has a tag decoder, the photo decoder's words (None: before decoding), expected route)
CASES = [
    ("familiar photo: the photo decoder", signals(), True, None, Route(PHOTO, False)),
    ("familiar, its caption passes the checks", signals(person=0.9), True, "a man on a bench", Route(PHOTO, False)),
    ("unfamiliar: the tag decoder, unsure", signals(familiarity=0.01), True, None, Route(TAGS, True)),
    ("unfamiliar, no tag decoder: the photo's caption, unsure", signals(familiarity=0.01), False, None,
     Route(PHOTO, True)),
    ("unfamiliar, no tag at all: the photo's caption, unsure", signals(familiarity=0.01, tags=[]), True, None,
     Route(PHOTO, True)),
    ("unfamiliar but surely people: the photo's caption, unsure", signals(familiarity=0.01, person=0.9995), True,
     None, Route(PHOTO, True)),
    ("no familiarity profile: never unfamiliar", signals(familiarity=None), True, None, Route(PHOTO, False)),
    ("a dog the encoder does not see: rewritten from tags", signals(dog=0.01), True, "a dog runs", Route(TAGS, True)),
    ("a dog the encoder sees: kept", signals(dog=0.3), True, "a dog runs", Route(PHOTO, False)),
    ("a hot dog is food, not a dog", signals(dog=0.01), True, "a hot dog on a plate", Route(PHOTO, False)),
    ("a person the probe does not see: rewritten from tags", signals(person=0.2), True, "a boy in a field",
     Route(TAGS, True)),
    ("no person probe: no person check", signals(person=None), True, "a boy in a field", Route(PHOTO, False)),
    ("an unseen dog without a tag decoder: kept, unsure", signals(dog=0.01), False, "a dog runs", Route(PHOTO, True)),
    ("an unseen dog and no tag: kept, unsure", signals(dog=0.01, tags=[]), True, "a dog runs", Route(PHOTO, True)),
    ("unfamiliar, surely people, a person named: kept, unsure", signals(familiarity=0.01, person=0.9995), True,
     "a man on a bench", Route(PHOTO, True)),
]


@pytest.mark.parametrize("case, photo, has_tag_decoder, words, expected", CASES, ids=[c[0] for c in CASES])
def test_route(case, photo, has_tag_decoder, words, expected):
    assert route(photo, SETTINGS, has_tag_decoder, None if words is None else words.split()) == expected


def test_each_threshold_can_switch_its_rule_off():
    assert route(signals(familiarity=0.01), RoutingConfig(unsure_below=0.0), True) == Route(PHOTO, False)
    assert route(signals(dog=0.01), RoutingConfig(unseen_dog_below=0.0), True, ["a", "dog"]) == Route(PHOTO, False)
    assert route(signals(person=0.2), RoutingConfig(unseen_person_below=0.0), True, ["a", "man"]) == Route(PHOTO, False)
    unfamiliar_people = signals(familiarity=0.01, person=0.9999)
    assert route(unfamiliar_people, RoutingConfig(people_sure_above=1.0), True) == Route(TAGS, True)


def test_the_word_lists_know_plurals_and_food():
    assert mentions_person("two girls play".split()) and not mentions_person("a couple of cats".split())
    assert mentions_dog("puppies".split()) and not mentions_dog("corn dogs".split())


def test_a_batchs_signals_are_read_once_from_the_encoders_head():
    concepts = ConceptWords(["dog", "dog", "cat", ""])  # two dog classes, one cat, one class no caption names
    class_probs = torch.tensor([[0.3, 0.3, 0.1, 0.3], [0.0, 0.02, 0.9, 0.08]])
    first, second = batch_signals(torch.zeros(2, 4), class_probs, concepts)
    assert first.dog == pytest.approx(0.6) and first.tags == [("dog", 0.6), ("cat", 0.1)]
    assert second.tags == [("cat", 0.9)] and second.familiarity is None and second.person is None
