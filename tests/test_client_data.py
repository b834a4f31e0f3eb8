import numpy as np
import pytest

from fedjax_tl.data.client_data import Dataset, FederatedData


def test_cohort_is_fixed_shape_padded_and_masked(tiny_data):
  assert tiny_data.pad_size == 12
  np.testing.assert_array_equal(tiny_data.client_sizes, [7, 12, 3, 9, 1])
  cohort = tiny_data.cohort([2, 0], pad_clients_to=3)
  assert cohort.indices.shape == (3, 12)
  np.testing.assert_array_equal(cohort.num_examples, [3, 7, 0])
  np.testing.assert_array_equal(cohort.client_ids, [2, 0, -1])
  x, y, mask = tiny_data.gather(cohort)
  assert x.shape == (3, 12, 8, 8, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(mask.sum(1), [3, 7, 0])
  for row, cid in enumerate([2, 0]):
    idx = tiny_data.client_indices[cid]
    np.testing.assert_array_equal(np.asarray(x[row, : len(idx)]), np.asarray(tiny_data.x)[idx])
    np.testing.assert_array_equal(np.asarray(y[row, : len(idx)]), np.asarray(tiny_data.y)[idx])


def test_bad_input_is_rejected(tiny_data):
  with pytest.raises(ValueError, match="client ids"):
    tiny_data.cohort([5])
  with pytest.raises(ValueError, match="pad_clients_to"):
    tiny_data.cohort([0, 1], pad_clients_to=1)
  d = Dataset(np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int32), 2)
  with pytest.raises(ValueError, match="outside"):
    FederatedData.from_partition(d, [np.array([0, 9])])
  with pytest.raises(ValueError, match="pad_size"):
    FederatedData.from_partition(d, [np.arange(4)], pad_size=2)
  with pytest.raises(ValueError, match="examples but y"):
    Dataset(np.zeros((3, 1)), np.zeros(2), 2)
