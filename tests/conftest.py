"""Shared fixtures, and two settings that make the suite compile less (set before JAX starts).

* Unoptimised CPU code: XLA's LLVM optimisation passes and its MLIR fusion emitters dominate compiling, and the
  tiny test programs do not notice the slower code they give (without LLVM optimisation about a third less CPU
  time for the suite; with XLA's older loop emitters for fusions, half the compile time again). Semantics are the
  same; set ``FEDJAX_TL_TEST_FULL_OPT=1`` to test the programs as users' runs compile them.
* One persistent compilation cache per test run, shared by the xdist workers and the subprocesses the tests start
  (resumed runs, the notebook kernel): a program compiled by one module or process is loaded, not compiled again,
  by the next. It lives in a fresh temporary directory, removed at the end of the run, so nothing is reused
  between runs.
"""

import os
import shutil
import tempfile

if os.environ.get("FEDJAX_TL_TEST_FULL_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false").strip()
if "FEDJAX_TL_TEST_CACHE" not in os.environ:  # the controller (or a plain run): the workers inherit it
  os.environ["FEDJAX_TL_TEST_CACHE"] = tempfile.mkdtemp(prefix="fedjax_tl_test_cache_")
  _OWN_CACHE = True
else:
  _OWN_CACHE = False
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FEDJAX_TL_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["FEDJAX_TL_TEST_CACHE"], ignore_errors=True)


class WorkStarted(Exception):
  """Raised by the ``no_work`` fixture's stubs where an entry point starts loading data, weights, pretraining or
  compiling: validation must have finished before this."""


@pytest.fixture
def no_work(monkeypatch):
  """The experiments' loaders (digits data and pretraining, cifar10 weights and data, the planner's compiles, the
  worked tasks' diabetes data and help topics) raise :class:`WorkStarted`."""
  from fedjax_tl.experiments import cifar10, diabetes, digits, text
  from fedjax_tl.experiments import plan as plan_cli

  def stop(*_, **__):
    raise WorkStarted

  monkeypatch.setattr(digits, "load_digits", stop)
  monkeypatch.setattr(digits, "pretrain", stop)
  monkeypatch.setattr(cifar10, "load_pretrained", stop)
  monkeypatch.setattr(cifar10, "load_data", stop)
  monkeypatch.setattr(plan_cli, "run", stop)
  monkeypatch.setattr(diabetes, "load_clients", stop)
  monkeypatch.setattr(text, "load_topics", stop)
