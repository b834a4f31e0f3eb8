import jax
import jax.numpy as jnp
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


def _images(n):
  return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)


def test_labels_must_be_integer_class_indices():
  """Float labels were cast to int32 (2.39 -> 2, -3.44 -> -3); now they raise naming the values and the fix."""
  parts = [np.arange(2), np.arange(2, 4)]
  with pytest.raises(ValueError, match=r"integer class indices.*float64.*2 are not whole numbers.*2\.39.*astype"):
    FederatedData.from_partition(Dataset(_images(4), np.array([2.39, -3.44, 1.0, 0.0]), 3), parts)
  with pytest.raises(ValueError, match="integer class indices.*float32.*astype"):  # whole numbers, still explicit
    FederatedData.from_partition(Dataset(_images(4), np.array([2.0, 0.0, 1.0, 0.0], np.float32), 3), parts)
  with pytest.raises(ValueError, match=r"2 Dataset labels are outside \[0, 3\) \(values \[-1, 3\]\)"):
    Dataset(_images(4), np.array([0, -1, 3, 2]), 3)
  with pytest.raises(ValueError, match=r"FederatedData labels are outside \[0, 3\)"):  # built directly
    FederatedData(jnp.asarray(_images(4)), jnp.array([0, 1, 2, 5]), parts, 3)
  ok = FederatedData.from_partition(Dataset(_images(4), np.array([0, 2, 1, 2], np.int64), 3), parts)
  assert ok.y.dtype == jnp.int32 and ok.label_range == (0, 2)
  np.testing.assert_array_equal(ok.y, [0, 2, 1, 2])


def test_a_federation_of_empty_clients_is_rejected():
  d = Dataset(_images(4), np.array([0, 1, 2, 0]), 3)
  with pytest.raises(ValueError, match="Every one of the 3 clients has 0 examples"):
    FederatedData.from_partition(d, [np.array([], np.int64)] * 3)
  FederatedData.from_partition(d, [np.array([], np.int64), np.arange(4)])  # some empty clients are fine


def test_labels_beyond_the_models_outputs_are_rejected(tiny_model, tiny_params):
  """tiny_model has 3 outputs: a label 3 gave NaN losses ("model diverged"), -1 the last class in evaluation."""
  import optax

  from fedjax_tl.core.client import LocalTraining
  from fedjax_tl.core.evaluate import evaluate
  from fedjax_tl.core.fedavg import FedAvg

  params, state = tiny_params
  data = FederatedData.from_partition(Dataset(_images(6), np.array([0, 1, 2, 3, 4, 0]), 5),
                                      [np.arange(3), np.arange(3, 6)])
  algo = FedAvg(LocalTraining(tiny_model, optax.sgd(0.1), batch_size=2), schedule="vmap")
  with pytest.raises(ValueError, match=r"labels up to 4 \(num_classes=5\) but the model has 3 outputs.*num_classes=5"):
    algo.apply(algo.init(params, state), data, np.array([0, 1]), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"1 evaluation labels .*3 outputs.* are outside \[0, 3\) \(values \[-1\]\)"):
    evaluate(tiny_model, params, state, _images(3), np.array([0, -1, 2]))
  with pytest.raises(ValueError, match="integer class indices"):
    evaluate(tiny_model, params, state, _images(3), np.array([0.5, 1.0, 2.0]))
