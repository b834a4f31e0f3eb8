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


def load_tfds(name: str, split: str, data_dir: str | None = None, download: bool = True,
              image_key: str = "image", label_key: str = "label") -> Dataset:
  """Any tensorflow-datasets image classification dataset (cifar10, cifar100, ...) as a uint8 :class:`Dataset`.

  Needs the optional dependency ``pip install 'fedjax_tl[tfds]'``. With ``download=False`` or no network, a
  missing dataset raises a ``FileNotFoundError`` that says how to provide it.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("tfds datasets need tensorflow-datasets: pip install 'fedjax_tl[tfds]'") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError (a subclass of ValueError/KeyError by version)
    raise ValueError(f"Unknown tfds dataset {name!r}: {e}") from e
  try:
    if download:
      builder.download_and_prepare()
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except Exception as e:
    raise FileNotFoundError(
        f"Could not load tfds dataset {name!r} split {split!r} from data_dir={builder.data_dir!r} ({e}). "
        "Without network, prepare it on a machine with network (python -c \"import tensorflow_datasets as "
        f"tfds; tfds.load('{name}', data_dir='DIR')\"), copy DIR here and pass --data_dir=DIR.") from e
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"tfds dataset {name!r} has features {list(features)}; need {image_key!r} and {label_key!r}.")
  xs, ys = [], []
  for batch in tfds.as_numpy(ds.batch(1024)):
    xs.append(batch[image_key])
    ys.append(batch[label_key])
  x = np.concatenate(xs)
  if x.dtype != np.uint8:
    raise ValueError(f"tfds dataset {name!r} images are {x.dtype}; expected uint8.")
  return Dataset(x, np.concatenate(ys).astype(np.int32), int(features[label_key].num_classes))
