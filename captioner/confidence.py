"""How familiar a photo is to the model: the honest part of a caption.

A decoder trained on Flickr8k writes a fluent Flickr8k sentence about any photo. Whether to
believe it depends on whether the photo looks like the ones it learned from. The profile keeps
k-means centroids of the training photos' features (direction only) and the nearest-centroid
similarities of held-out (dev) photos. A photo's familiarity is the share of those dev photos
that sit no closer to the training photos than it does: 0.5 is a typical training-like photo,
0.01 is stranger than 99% of them. Below the model's `decode.unsure_below` (0.05 unless chosen
otherwise) the app and the CLI say the caption is unsure and show the tags, and a model with a
fallback decoder writes that caption from the tags instead (fallback.py).
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
class DomainProfile:
    centroids: torch.Tensor  # [K, D] unit vectors: where the training photos' features point
    dev_similarity: torch.Tensor  # [M] sorted: held-out photos' similarity to their nearest centroid

    @classmethod
    def fit(cls, train_features: torch.Tensor, dev_features: torch.Tensor, k: int = CENTROIDS) -> "DomainProfile":
        if len(train_features) == 0 or len(dev_features) == 0:
            raise ValueError("a domain profile needs training and held-out features")
        centroids = kmeans(_directions(train_features), min(k, len(train_features)))
        profile = cls(centroids, torch.zeros(0))
        profile.dev_similarity = profile.similarity(dev_features).sort().values
        return profile

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        return (_directions(features.cpu()) @ self.centroids.float().T).max(1).values

    def familiarity(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> [B] in [0, 1]: the share of dev photos no more familiar than each photo."""
        ranks = torch.searchsorted(self.dev_similarity.float(), self.similarity(features), right=True)
        return ranks.float() / len(self.dev_similarity)

    def to_dict(self) -> dict:
        return {"centroids": self.centroids.half(), "dev_similarity": self.dev_similarity.float()}

    @classmethod
    def from_dict(cls, values: dict) -> "DomainProfile":
        return cls(values["centroids"].float(), values["dev_similarity"].float())
