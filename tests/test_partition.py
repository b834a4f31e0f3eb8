import numpy as np
import pytest

from fedjax_tl.data import partition


def _labels(n=1000, k=10, seed=0):
  return np.random.default_rng(seed).integers(0, k, n)


def _assert_exact_cover(parts, n):
  flat = np.concatenate(parts)
  assert len(flat) == n
  np.testing.assert_array_equal(np.sort(flat), np.arange(n))


@pytest.mark.parametrize("name", partition.PARTITIONERS)
def test_every_example_assigned_exactly_once(name):
  y = _labels()
  parts = partition.make_partition(name, y, 20, seed=3, alpha=0.5, min_size=5)
  assert len(parts) == 20
  _assert_exact_cover(parts, len(y))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_seeded_and_deterministic(name):
  y = _labels()
  a = partition.make_partition(name, y, 10, seed=1)
  b = partition.make_partition(name, y, 10, seed=1)
  c = partition.make_partition(name, y, 10, seed=2)
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
  s = partition.sizes(partition.iid(1003, 10, seed=0))
  assert s.max() - s.min() <= 1 and s.sum() == 1003


def test_strided_is_x_i_colon_n():
  parts = partition.strided(23, 5)
  for i, p in enumerate(parts):
    np.testing.assert_array_equal(p, np.arange(23)[i::5])


def _mean_max_class_fraction(parts, y):
  return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])


def test_dirichlet_skew_follows_alpha():
  y = _labels(5000)
  skew = {a: _mean_max_class_fraction(partition.dirichlet(y, 20, a, seed=0), y) for a in (0.05, 1.0, 100.0)}
  # Small alpha: clients dominated by one class; large alpha: close to the global 10% per class.
  assert skew[0.05] > 0.6
  assert skew[0.05] > skew[1.0] > skew[100.0]
  assert skew[100.0] < 0.2


def test_dirichlet_min_size_and_impossible_request():
  y = _labels(500)
  parts = partition.dirichlet(y, 10, 0.1, seed=0, min_size=10)
  assert partition.sizes(parts).min() >= 10
  with pytest.raises(ValueError, match="min_size"):
    partition.dirichlet(y, 10, 0.1, seed=0, min_size=60)
  with pytest.raises(ValueError, match="alpha"):
    partition.dirichlet(y, 10, 0.0)


def test_shards_give_few_classes_per_client():
  y = np.repeat(np.arange(10), 100)
  parts = partition.shards(y, 50, shards_per_client=2, seed=0)
  classes = [len(np.unique(y[p])) for p in parts]
  assert max(classes) <= 2 * 2  # a shard straddles at most two classes
  assert np.mean(classes) <= 2.5
  assert set(partition.sizes(parts)) == {20}


def test_errors_are_clear():
  with pytest.raises(ValueError, match="Unknown partition"):
    partition.make_partition("nope", _labels(), 3)
  with pytest.raises(ValueError, match="clients"):
    partition.iid(3, 5)
