"""How familiar a photo is to the model: the honest part of a caption.

A decoder trained on Flickr8k writes a fluent Flickr8k sentence about any photo. Whether to
believe it depends on whether the photo looks like the ones it learned from. The profile keeps
k-means centroids of the training photos' features (direction only) and the nearest-centroid
similarities of held-out (dev) photos. A photo's familiarity is the share of those dev photos
that sit no closer to the training photos than it does: 0.5 is a typical training-like photo,
0.01 is stranger than 99% of them. routing.py reads it: below `routing.unsure_below` (0.05 unless
set otherwise) a caption is unsure, and a model with a tag decoder writes it from the tags instead.

The profile can also hold a person probe: whether a photo shows people, learnt from the training
photos' references. Flickr8k's decoder knows people well and little else, so an unfamiliar photo
the probe is sure shows people keeps that decoder's caption, and a caption that names a person the
probe does not see is unsure, as one naming a dog the ImageNet head does not see is (routing.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CENTROIDS = 64


def _directions(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def kmeans(points: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """Spherical k-means on unit vectors [N, D] -> k unit centroids [k, D] (deterministic for a seed)."""
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        nearest = (points @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=len(centroids)).unsqueeze(1)
        centroids = torch.where(counts > 0, _directions(sums), centroids)
    return centroids


@dataclass
class PersonProbe:
    """P(the photo shows people): a logistic regression on pooled features.

    Fitted on the training photos whose references mostly name a person (at least half of them)
    against those where none does; photos in between are left out. On Flickr8k the photos without
    people are mostly dogs, so it is sure of "no person" only far from people; it is a check on the
    decoder's person words, not a detector.
    """
    weight: torch.Tensor  # [D], the features' standardisation folded in
    bias: torch.Tensor  # []

    @classmethod
    def fit(cls, features: torch.Tensor, person_share: torch.Tensor, l2: float = 1e-3) -> "PersonProbe | None":
        """Features [N, D] and each photo's share of references naming a person [N]; None without both kinds."""
        chosen = (person_share >= 0.5) | (person_share == 0)
        labels = (person_share[chosen] >= 0.5).float()
        if int(labels.sum()) in (0, len(labels)):
            return None
        with torch.inference_mode(False), torch.enable_grad():  # a fit, wherever it is called from
            points, labels = features[chosen].cpu().float().clone(), labels.clone()
            mean, scale = points.mean(0), points.std(0) + 1e-6
            standard = (points - mean) / scale
            weight = torch.zeros(points.shape[1], requires_grad=True)
            bias = torch.zeros((), requires_grad=True)
            optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

            def loss():
                optimizer.zero_grad()
                value = torch.nn.functional.binary_cross_entropy_with_logits(standard @ weight + bias, labels) \
                    + l2 * weight.pow(2).sum()
                value.backward()
                return value

            optimizer.step(loss)
            folded = (weight / scale).detach()
            return cls(folded, (bias - mean @ folded).detach())

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> [B] in [0, 1]."""
        return torch.sigmoid(features.cpu().float() @ self.weight.float() + self.bias.float())


@dataclass
class DomainProfile:
    centroids: torch.Tensor  # [K, D] unit vectors: where the training photos' features point
    dev_similarity: torch.Tensor  # [M] sorted: held-out photos' similarity to their nearest centroid
    person: PersonProbe | None = None

    @classmethod
    def fit(cls, train_features: torch.Tensor, dev_features: torch.Tensor, k: int = CENTROIDS,
            person_share: torch.Tensor | None = None) -> "DomainProfile":
        """`person_share`: each training photo's share of references naming a person, for the person probe."""
        if len(train_features) == 0 or len(dev_features) == 0:
            raise ValueError("a domain profile needs training and held-out features")
        centroids = kmeans(_directions(train_features), min(k, len(train_features)))
        profile = cls(centroids, torch.zeros(0))
        profile.dev_similarity = profile.similarity(dev_features).sort().values
        if person_share is not None:
            profile.person = PersonProbe.fit(train_features, person_share)
        return profile

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        return (_directions(features.cpu()) @ self.centroids.float().T).max(1).values

    def familiarity(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> [B] in [0, 1]: the share of dev photos no more familiar than each photo."""
        ranks = torch.searchsorted(self.dev_similarity.float(), self.similarity(features), right=True)
        return ranks.float() / len(self.dev_similarity)

    def to_dict(self) -> dict:
        values = {"centroids": self.centroids.half(), "dev_similarity": self.dev_similarity.float()}
        if self.person is not None:
            values.update(person_weight=self.person.weight.float(), person_bias=self.person.bias.float())
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DomainProfile":
        person = PersonProbe(values["person_weight"].float(), values["person_bias"].float()) \
            if "person_weight" in values else None
        return cls(values["centroids"].float(), values["dev_similarity"].float(), person)
