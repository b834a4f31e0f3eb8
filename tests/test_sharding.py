"""Sharding a cohort across devices (8 fake CPU devices) gives the single-device result."""

import os
import subprocess
import sys

SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import jax, numpy as np, optax
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg, client_mesh
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.models.base import Model
from fedjax_tl.models.cnn import CNN

assert len(jax.devices()) == 8, jax.devices()
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (60, 8, 8, 1)).astype(np.uint8)
y = rng.integers(0, 3, 60).astype(np.int32)
parts = np.array_split(rng.permutation(60), 10)
data = FederatedData.from_partition(Dataset(x, y, 3), parts)
model = Model(CNN(num_classes=3, features=(4,), hidden=8), (8, 8, 1))
params, state = model.init(jax.random.PRNGKey(0))
local = LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=1)
ids = np.array([0, 2, 3, 5, 9])  # 5 clients: padded to 8 for 8 devices
key = jax.random.PRNGKey(4)
ref_algo = FedAvg(local, schedule="vmap")
ref, _ = ref_algo.apply(ref_algo.init(params, state), data, ids, key)
mesh = client_mesh()
for spec in ("vmap", "chunked:8"):
  algo = FedAvg(local, schedule=spec, mesh=mesh)
  out, m = algo.apply(algo.init(params, state), data, ids, key)
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert m["client_metrics"]["num_examples"].shape == (5,)
  runner = algo.runner(data.pad_size)
  cohort = data.cohort(ids, pad_clients_to=runner.padded_cohort_size(len(ids)))
  assert cohort.size == 8
  hlo = runner._round_jit.lower(algo.init(params, state).params, {}, state, data.x, data.y, cohort,
                                key, None, None).compile().as_text()
  assert "all-reduce" in hlo, "the sum over clients should be a cross-device reduction"
try:
  FedAvg(local, schedule="sequential/host:4", mesh=mesh).runner(data.pad_size)
except ValueError as e:
  assert "one-program" in str(e)
else:
  raise AssertionError("host loop with a mesh must be refused")
print("SHARDING OK")
"""


def test_sharded_cohort_matches_single_device():
  # keeps the suite's quick-compile XLA flags (conftest.py): the same programs, compiled in a fraction of the time
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = dict(os.environ, XLA_FLAGS=flags)
  p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
  assert p.returncode == 0 and "SHARDING OK" in p.stdout, p.stderr[-3000:]
