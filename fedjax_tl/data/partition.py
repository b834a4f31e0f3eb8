"""Seeded, pure-numpy partitioners: example indices -> one index array per client.

Every partitioner assigns each example to exactly one client (tested) and returns a list of sorted int64
index arrays, one per client. Randomness comes from ``np.random.default_rng(seed)`` only, so a partition is a
pure function of its arguments.

References:
  * Dirichlet label skew: Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019.
  * Shards / k classes per client: McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Partition = list[np.ndarray]

__all__ = ["iid", "strided", "dirichlet", "shards", "sizes", "PARTITIONERS", "make_partition"]


def _check_counts(num_examples: int, num_clients: int, min_size: int = 1) -> None:
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if num_examples < num_clients * min_size:
    raise ValueError(
        f"Cannot give {num_clients} clients at least {min_size} example(s) each from {num_examples} examples; "
        "use fewer clients or a smaller min_size.")


def _finish(parts: Sequence[np.ndarray]) -> Partition:
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_examples: int, num_clients: int, seed: int = 0) -> Partition:
  """Uniformly random split into ``num_clients`` near-equal parts (sizes differ by at most one)."""
  _check_counts(num_examples, num_clients)
  perm = np.random.default_rng(seed).permutation(num_examples)
  return _finish(np.array_split(perm, num_clients))


def strided(num_examples: int, num_clients: int) -> Partition:
  """The deterministic split ``x[i::num_clients]`` used by the article this project comes from."""
  _check_counts(num_examples, num_clients)
  return _finish([np.arange(i, num_examples, num_clients) for i in range(num_clients)])


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1,
              max_tries: int = 1000) -> Partition:
  """Label-skewed split: for each class, proportions over clients ~ Dirichlet(alpha) (Hsu et al. 2019).

  Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws are repeated (with the
  same generator, so still deterministic in ``seed``) until every client holds at least ``min_size``
  examples, as in the reference implementation.

  Args:
    labels: int array [num_examples] of class labels.
    num_clients: number of clients.
    alpha: Dirichlet concentration, > 0.
    seed: seed of the numpy generator.
    min_size: minimum number of examples per client.
    max_tries: give up (ValueError) after this many draws that leave a client below ``min_size``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  if not alpha > 0:
    raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}.")
  _check_counts(len(labels), num_clients, min_size)
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
      idx = rng.permutation(idx)
      props = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
      for k, piece in enumerate(np.split(idx, cuts)):
        parts[k].append(piece)
    out = [np.concatenate(p) for p in parts]
    if min(len(p) for p in out) >= min_size:
      return _finish(out)
  raise ValueError(
      f"dirichlet(alpha={alpha}) left a client with fewer than min_size={min_size} examples in {max_tries} "
      "draws; raise alpha, lower min_size or use fewer clients.")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> Partition:
  """Pathological non-IID split of McMahan et al. 2017: sort by label, cut into equal shards, deal each client
  ``shards_per_client`` random shards, so most clients see about that many classes."""
  labels = np.asarray(labels)
  num_shards = num_clients * shards_per_client
  _check_counts(len(labels), num_shards)
  rng = np.random.default_rng(seed)
  # Stable sort by label with a random tie-break, so shards of one class are a random subset of it.
  order = np.lexsort((rng.random(len(labels)), labels))
  pieces = np.array_split(order, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return _finish([np.concatenate([pieces[s] for s in row]) for row in deal])


def sizes(partition: Partition) -> np.ndarray:
  return np.array([len(p) for p in partition], dtype=np.int64)


PARTITIONERS = ("iid", "strided", "dirichlet", "shards")


def make_partition(name: str, labels: np.ndarray, num_clients: int, seed: int = 0, alpha: float = 0.5,
                   shards_per_client: int = 2, min_size: int = 1) -> Partition:
  """Partition by name (for configs and command lines)."""
  n = len(labels)
  if name == "iid":
    return iid(n, num_clients, seed)
  if name == "strided":
    return strided(n, num_clients)
  if name == "dirichlet":
    return dirichlet(labels, num_clients, alpha, seed, min_size)
  if name == "shards":
    return shards(labels, num_clients, shards_per_client, seed)
  raise ValueError(f"Unknown partition {name!r}; choose one of {PARTITIONERS}.")
