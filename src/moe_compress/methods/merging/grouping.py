"""Grouping experts for merging: a similarity signal -> k clusters (one merged expert per cluster).

An expert is represented by a `Signal`: either a similarity matrix S [E, E] (larger = more alike) or feature
vectors F [E, D]. Clustering rules:

- ``kmeans`` (Sub-MoE): Lloyd's algorithm with k-means++ seeding, Euclidean, on the rows of F or, for a
  similarity, on the rows of S (expert i is the vector of its similarities to every expert: experts with
  similar similarity profiles cluster together). ``n_init`` seeded restarts, lowest inertia wins; an empty
  cluster is refilled with the point farthest from its centre among clusters of two or more, so every cluster
  is non-empty whenever k <= E.
- ``hierarchical`` (HC-SMoE): agglomerative, ``average`` / ``single`` / ``complete`` linkage (scipy) on the
  Euclidean distance between features, or on 1 - S; the tree is cut after exactly E - k merges.
- ``dominant`` (M-SMoE): the k most frequent experts are the centres; every other expert joins the centre it
  is most similar to (S, or minus the Euclidean distance for features). Ties: lower index.

DeepSeek group-limited routing (``n_group`` G > 1): experts [g E/G, (g+1) E/G) form routing group g. Groups
never cross routing groups and each routing group is clustered on its own into k/G clusters, so the merged
layer again has the same count (k/G) in every routing group, in the same order (`group_experts` returns the
clusters of routing group 0 first, then 1, ...), and group-limited routing keeps its meaning.

Clusters are returned as sorted lists of original expert indices, ordered by their smallest member (within a
routing group). Everything is deterministic given the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Clustering = Literal["kmeans", "hierarchical", "dominant"]
Linkage = Literal["average", "single", "complete"]


@dataclass
class Signal:
    """How experts are compared: ``similarity`` [E, E] or ``features`` [E, D] (exactly one is set)."""

    similarity: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.similarity is not None and self.features is None:
            s = self.similarity.detach().double().cpu()
            self.similarity = (s + s.T) / 2
        elif self.features is not None and self.similarity is None:
            self.features = self.features.detach().double().cpu()
        else:
            raise ValueError("a Signal has exactly one of similarity or features")

    @property
    def n(self) -> int:
        return self.points().shape[0]

    def sub(self, idx: list[int]) -> "Signal":
        i = torch.as_tensor(idx, dtype=torch.long)
        if self.similarity is not None:
            return Signal(similarity=self.similarity[i][:, i])
        return Signal(features=self.points()[i])

    def points(self) -> torch.Tensor:
        """[E, D] points for k-means: the features, or the similarity rows."""
        t = self.features if self.features is not None else self.similarity
        assert t is not None  # __post_init__: exactly one is set
        return t

    def distances(self) -> torch.Tensor:
        """[E, E] symmetric distances with zero diagonal: Euclidean on features, or 1 - S (clipped at 0)."""
        if self.features is not None:
            d = torch.cdist(self.features, self.features)
        else:
            d = (1.0 - self.points()).clamp(min=0.0)
        d = (d + d.T) / 2
        return d.fill_diagonal_(0.0)

    def affinity(self) -> torch.Tensor:
        """[E, E] larger = more alike: S, or minus the Euclidean distance."""
        return self.similarity if self.similarity is not None else -self.distances()


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Relabel clusters 0..k-1 in the order of their smallest member."""
    out = torch.empty_like(labels)
    mapping: dict[int, int] = {}
    for i, c in enumerate(labels.tolist()):
        mapping.setdefault(c, len(mapping))
        out[i] = mapping[c]
    return out


# -- k-means ----------------------------------------------------------------------------------------------
def _sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: first centre uniform, then each next point with probability ~ D^2 (distinct points;
    if every remaining point coincides with a centre, uniform over the unchosen ones)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(-1)
    for _ in range(1, k):
        free = torch.ones(n, dtype=torch.float64)
        free[chosen] = 0.0
        w = d2 * free
        if not float(w.sum()) > 0.0:
            w = free
        nxt = int(torch.multinomial(w, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    return x[chosen].clone()


def _fill_empty(labels: torch.Tensor, d2: torch.Tensor, k: int) -> torch.Tensor:
    """Move, for each empty cluster, the point farthest from its centre among clusters of size >= 2."""
    labels = labels.clone()
    while True:
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() == 0:
            return labels
        own = d2.gather(1, labels[:, None]).squeeze(1)
        movable = counts[labels] >= 2
        own = torch.where(movable, own, torch.tensor(-1.0, dtype=own.dtype))
        best = float(own.max())
        i = int(torch.nonzero(own == best).flatten()[0])  # ties: lowest index
        labels[i] = int(empty[0])


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator | None = None, n_init: int = 8,
           max_iter: int = 100) -> torch.Tensor:
    """Cluster points [N, D] into exactly k non-empty clusters (1 <= k <= N). Returns labels [N] int64, clusters
    numbered by their smallest member. Deterministic given the generator state."""
    x = points.detach().double().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: cannot make {k} clusters from {n} points")
    if k == n:
        return torch.arange(n)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    best: torch.Tensor | None = None
    best_inertia = float("inf")
    for _ in range(max(1, n_init)):
        centres = _kmeanspp(x, k, gen)
        labels: torch.Tensor | None = None
        for _ in range(max_iter):
            d2 = _sqdist(x, centres)
            new = _fill_empty(d2.argmin(dim=1), d2, k)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            onehot = torch.zeros(n, k, dtype=torch.float64).scatter_(1, labels[:, None], 1.0)
            centres = (onehot.T @ x) / onehot.sum(0)[:, None]
        assert labels is not None, "k-means needs max_iter >= 1"
        inertia = float(_sqdist(x, centres).gather(1, labels[:, None]).sum())
        if inertia < best_inertia - 1e-12 * max(1.0, abs(best_inertia)) or best is None:
            best, best_inertia = labels, inertia
    assert best is not None  # at least one restart
    return canonical_labels(best)


# -- hierarchical -----------------------------------------------------------------------------------------
def hierarchical(distances: torch.Tensor, k: int, linkage: Linkage = "average") -> torch.Tensor:
    """Agglomerative clustering of a distance matrix [N, N] into exactly k clusters: scipy's linkage tree, cut
    after its first N - k merges. Returns labels [N], numbered by smallest member."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    if linkage not in ("average", "single", "complete"):
        raise ValueError(f"unknown linkage {linkage!r}")  # never fall back silently (HC-SMoE's pitfall)
    n = distances.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"hierarchical: cannot make {k} clusters from {n} points")
    if k == n:
        return torch.arange(n)
    d = distances.detach().double().cpu()
    condensed = squareform(((d + d.T) / 2).fill_diagonal_(0.0).clamp(min=0.0).numpy(), checks=False)
    tree = scipy_linkage(condensed, method=linkage)
    parent = list(range(2 * n - 1))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for step, row in enumerate(tree[: n - k]):
        parent[find(int(row[0]))] = n + step
        parent[find(int(row[1]))] = n + step
    return canonical_labels(torch.tensor([find(i) for i in range(n)]))


# -- dominant experts -------------------------------------------------------------------------------------
def dominant(affinity: torch.Tensor, freq: torch.Tensor, k: int) -> torch.Tensor:
    """M-SMoE grouping: the k most frequent experts (ties: lower index) are centres; every other expert joins
    the centre of highest affinity [N, N] (ties: the more frequent centre). Returns labels [N]."""
    n = affinity.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"dominant grouping: cannot make {k} groups from {n} experts")
    f = freq.detach().double().cpu()
    order = sorted(range(n), key=lambda e: (-float(f[e]), e))
    centres = order[:k]
    a = affinity.detach().double().cpu()[:, centres]  # [N, k]
    labels = a.argmax(dim=1)
    labels[centres] = torch.arange(k)
    return canonical_labels(labels)


# -- the entry point --------------------------------------------------------------------------------------
def cluster(signal: Signal, k: int, clustering: Clustering, freq: torch.Tensor | None = None,
            generator: torch.Generator | None = None, linkage: Linkage = "average", n_init: int = 8) -> torch.Tensor:
    """Labels [E] for one set of experts."""
    if clustering == "kmeans":
        return kmeans(signal.points(), k, generator, n_init=n_init)
    if clustering == "hierarchical":
        return hierarchical(signal.distances(), k, linkage)
    if clustering == "dominant":
        if freq is None:
            raise ValueError("dominant grouping needs expert frequencies")
        return dominant(signal.affinity(), freq, k)
    raise ValueError(f"unknown clustering {clustering!r}")


def group_experts(signal: Signal, k: int, clustering: Clustering, *, n_group: int = 1,
                  freq: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  linkage: Linkage = "average", n_init: int = 8) -> list[list[int]]:
    """Partition the E experts into k groups (sorted lists of expert indices).

    With ``n_group`` G > 1 (DeepSeek group-limited routing) each contiguous routing group of E/G experts is
    clustered on its own into k/G groups (k and E must be divisible by G); the groups of routing group 0 come
    first, so the merged experts keep G equal routing groups in order.
    """
    e_count = signal.n
    if not 1 <= k <= e_count:
        raise ValueError(f"cannot group {e_count} experts into {k} groups")
    g_count = max(1, n_group)
    if e_count % g_count or k % g_count:
        raise ValueError(f"{e_count} experts into {k} groups: both must be divisible by n_group={g_count}")
    per, k_per = e_count // g_count, k // g_count
    groups: list[list[int]] = []
    for g in range(g_count):
        idx = list(range(g * per, (g + 1) * per))
        sub_freq = None if freq is None else freq.detach().double().cpu()[idx]
        labels = cluster(signal.sub(idx), k_per, clustering, sub_freq, generator, linkage, n_init)
        for c in range(k_per):
            groups.append([idx[i] for i in torch.nonzero(labels == c).flatten().tolist()])
    return groups
