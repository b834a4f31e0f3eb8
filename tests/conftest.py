import jax
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.models.base import Model
from fedjax_tl.models.cnn import CNN


# The tiny fixtures are module-scoped: every test of a module gets the same (immutable) model, data, LocalTraining and
# params objects, so equal FedAvg/CohortRunner configurations within a module share their compiled programs (a
# LocalTraining is only equal to another holding the same optax objects). The caches are cleared per module below.
@pytest.fixture(scope="module")
def tiny_model():
  return Model(CNN(num_classes=3, features=(4,), hidden=8), (8, 8, 1))


@pytest.fixture(scope="module")
def tiny_data():
  """Unequal clients (sizes 7, 12, 3, 9, 1) over 40 random uint8 8x8 images."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
  y = rng.integers(0, 3, 40).astype(np.int32)
  perm = rng.permutation(40)
  parts = np.split(perm, np.cumsum([7, 12, 3, 9, 1]))[:5]
  return FederatedData.from_partition(Dataset(x, y, 3), parts)


@pytest.fixture(scope="module")
def tiny_local(tiny_model):
  return LocalTraining(tiny_model, optax.sgd(0.1), batch_size=4, epochs=2)


@pytest.fixture(scope="module")
def tiny_params(tiny_model):
  return tiny_model.init(jax.random.PRNGKey(0))


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Each test module starts without the compiled programs of the previous ones: equal configurations share
  programs for the life of the process (fedjax_tl.core.execution), which across ~300 tests only grows memory."""
  yield
  from fedjax_tl.core import execution

  execution._COMPILED.clear()  # noqa: SLF001
  execution._jit_method.cache_clear()  # noqa: SLF001
  jax.clear_caches()
