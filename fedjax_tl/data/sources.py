"""Datasets that ship with a dependency (no download): scikit-learn's handwritten digits."""

from __future__ import annotations

import numpy as np

from fedjax_tl.data.client_data import Dataset

__all__ = ["load_digits", "split_by_labels", "train_test_split"]


def load_digits() -> Dataset:
  """The 1,797 8x8 UCI handwritten digits bundled with scikit-learn, as uint8 [N, 8, 8, 1] in [0, 255]."""
  from sklearn.datasets import load_digits as sk_load_digits

  d = sk_load_digits()
  x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return Dataset(x, d.target.astype(np.int32), 10)


def split_by_labels(data: Dataset, labels: list[int]) -> Dataset:
  """The examples whose label is in ``labels``, relabelled 0..len(labels)-1 in the given order."""
  keep = np.isin(data.y, labels)
  remap = np.full(int(data.y.max()) + 1, -1, np.int32)
  remap[np.asarray(labels)] = np.arange(len(labels))
  return Dataset(data.x[keep], remap[data.y[keep]], len(labels))


def train_test_split(data: Dataset, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
  """Seeded random split, stratified by label so both sides keep the class balance."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(data.y):
    idx = rng.permutation(np.flatnonzero(data.y == c))
    test.append(idx[: int(round(len(idx) * test_fraction))])
  test_idx = np.sort(np.concatenate(test))
  train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
  return data.subset(train_idx), data.subset(test_idx)
