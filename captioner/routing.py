"""Which decoder writes a photo's caption, and whether the caption is unsure: one decision per photo.

The photo decoder learned Flickr8k's world of people and dogs and writes it into any photo. Four
signals, computed once per batch, say when not to trust it:

    familiarity  how like the training photos the photo is, in [0, 1] (confidence.py; None: no profile)
    person       P(the photo shows people), from the person probe (confidence.py; None: no probe)
    dog          the encoder's ImageNet head's probability of "dog" (all dog breeds together)
    tags         the caption words the ImageNet head sees (concepts.py)

`route` maps them to a Route under the `routing` config section:

    unfamiliar (familiarity < unsure_below), with tags and a tag decoder,
      and not surely people (person <= people_sure_above)  -> the tag decoder writes it; unsure
    otherwise                                              -> the photo decoder writes it; unsure if unfamiliar
      then, once its words are known: it names a dog with dog < unseen_dog_below, or a person with
      person < unseen_person_below                         -> unsure; rewritten by the tag decoder if it can

The tag decoder writes only from tags: a photo with none keeps the photo decoder's caption.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .concepts import ConceptWords, Tag
from .config import RoutingConfig

# Left out as ambiguous: couple ("a couple of"), pitcher (a jug), batter (cake batter), runner
# (table runner), passenger ("passenger train"), family ("family room"), pronouns, catcher ("dream
# catcher") and worker.
PERSON_WORDS = frozenset("""
    person people man men woman women gentleman gentlemen lady ladies guy guys
    boy boys girl girls child children kid kids baby babies toddler toddlers teenager teenagers adult adults
    player players skier skiers surfer surfers skateboarder skateboarders snowboarder snowboarders
    skater skaters rider riders biker bikers cyclist cyclists climber climbers swimmer swimmers
    dancer dancers tourist tourists pedestrian pedestrians chef chefs umpire umpires crowd
""".split())
DOG_WORDS = frozenset("dog dogs doggy doggie puppy puppies pup pups".split())
FOOD_BEFORE_DOG = frozenset(("hot", "corn"))  # "hot dog", "corn dogs": food, not animals

PHOTO, TAGS = "photo", "tags"


def mentions_person(tokens: list[str]) -> bool:
    return any(token in PERSON_WORDS for token in tokens)


def mentions_dog(tokens: list[str]) -> bool:
    return any(token in DOG_WORDS and (i == 0 or tokens[i - 1] not in FOOD_BEFORE_DOG)
               for i, token in enumerate(tokens))


@dataclass(frozen=True)
class Signals:
    """What the routing reads about one photo."""
    familiarity: float | None
    person: float | None
    dog: float
    tags: list[Tag]


@dataclass(frozen=True)
class Route:
    writer: str  # PHOTO or TAGS: which decoder writes the caption
    unsure: bool


def batch_signals(pooled: torch.Tensor, class_probs: torch.Tensor, concept_words: ConceptWords,
                  domain=None) -> list[Signals]:
    """Pooled features [B, D] and the ImageNet head's class probabilities [B, 1000] -> each photo's signals."""
    words = concept_words.word_probabilities(class_probs)  # [B, W]
    tags = concept_words.top_tags(words)
    dog = words[:, concept_words.words.index("dog")].tolist()
    familiarity = domain.familiarity(pooled).tolist() if domain else [None] * len(pooled)
    person = domain.person.probability(pooled).tolist() if domain and domain.person else [None] * len(pooled)
    return [Signals(*values) for values in zip(familiarity, person, dog, tags)]


def route(signals: Signals, settings: RoutingConfig, has_tag_decoder: bool,
          photo_words: list[str] | None = None) -> Route:
    """Where a photo's caption comes from: before decoding (`photo_words` None), and again once the photo
    decoder's caption is known, whose words the dog and person checks read."""
    unfamiliar = signals.familiarity is not None and signals.familiarity < settings.unsure_below
    surely_people = signals.person is not None and signals.person > settings.people_sure_above
    tags_can_write = has_tag_decoder and bool(signals.tags)
    if unfamiliar and tags_can_write and not surely_people:
        return Route(TAGS, unsure=True)
    if photo_words is None:
        return Route(PHOTO, unsure=unfamiliar)
    unseen = (mentions_dog(photo_words) and signals.dog < settings.unseen_dog_below) or (
        signals.person is not None and mentions_person(photo_words) and signals.person < settings.unseen_person_below)
    return Route(TAGS if unseen and tags_can_write else PHOTO, unsure=unfamiliar or unseen)
