"""Per-client rows and data on the host (issue 25): bit-identical to the device store and on-device data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_tl as ftl
from fedjax_tl import store
from fedjax_tl.checkpoint import Checkpointer
from fedjax_tl.data.client_data import FederatedData, HostFederatedData
from fedjax_tl.transforms import compression


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _host_twin(data: FederatedData) -> HostFederatedData:
  return HostFederatedData(np.asarray(data.x), np.asarray(data.y), data.client_indices, data.num_classes)


COHORTS = [np.array([0, 2]), np.array([1, 3, 4]), np.array([0, 3])]


def _run(algo, state, data, rounds=COHORTS):
  for r, ids in enumerate(rounds):
    state, _ = algo.apply(state, data, ids, jax.random.PRNGKey(r))
  return state


@pytest.mark.parametrize("where,parts", [("host", {"params"}), ("disk", {"params", "uplink"})])
def test_host_store_matches_device_store_bit_for_bit(tiny_local, tiny_data, tiny_params, tmp_path, where, parts):
  # FedPer's personal head (and error-feedback residuals), kept per client, device vs host/disk rows.
  ef = compression.error_feedback(compression.top_k(0.5)) if "uplink" in parts else None
  algo = ftl.FedAvg(tiny_local, schedule="vmap", local_params="^head/", client_transform=ef)
  kind = "host" if where == "host" else f"disk:{tmp_path / 'rows'}"
  dev = _run(algo, algo.init(*tiny_params, num_clients=5), tiny_data)
  host0 = algo.init(*tiny_params, num_clients=5, client_store=kind)
  assert isinstance(host0.clients, ftl.HostStore) and set(host0.clients) == parts
  host = _run(algo, host0, tiny_data)
  _equal(host.params, dev.params)
  _equal(host.opt_state, dev.opt_state)
  _equal(dict(host.clients), dict(dev.clients))  # every row, also the never-trained client 2's initial head
  # the global head is the mean over clients: numpy's summation order vs XLA's, equal to rounding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), host.full_params(),
               dev.full_params())
  if where == "disk":
    assert (tmp_path / "rows" / "written.npy").exists()


def test_host_store_gathers_and_scatters_only_the_cohort(tmp_path):
  one = {"c": jnp.arange(2.0), "n": jnp.int32(5)}
  dev, host = store.population(one, 6), store.population(one, 6, f"disk:{tmp_path}")
  assert host.written.sum() == 0  # nothing written at init
  rows, ids = jnp.array([4, 1, 0]), jnp.array([4, 1])
  new = {"c": jnp.arange(6.0).reshape(3, 2) + 10, "n": jnp.array([7, 8, 9], jnp.int32)}
  _equal(store.gather(host, rows, 6), store.gather(dev, rows, 6))
  dev, host = store.scatter(dev, ids, new), store.scatter(host, ids, new)
  assert host.written.tolist() == [False, True, False, False, True, False]
  _equal(store.gather(host, jnp.arange(6), 6), store.gather(dev, jnp.arange(6), 6))
  assert store.num_rows(host) == 6


def test_host_store_misuse_is_named(tmp_path, tiny_local, tiny_data, tiny_params):
  f = tmp_path / "a_file"
  f.write_text("")
  with pytest.raises(ValueError, match="not a directory"):
    store.population({"c": jnp.zeros(2)}, 3, f"disk:{f}")
  with pytest.raises(ValueError, match="needs a directory path"):
    store.population({"c": jnp.zeros(2)}, 3, "disk:")
  with pytest.raises(ValueError, match="client_store must be"):
    store.population({"c": jnp.zeros(2)}, 3, "gpu")
  s = store.population({"c": jnp.zeros(2)}, 4, "host")
  with pytest.raises(ValueError, match="4 control variates.*5 clients"):
    store.gather(s, jnp.array([0]), 5, "control variates")
  algo = ftl.FedAvg(tiny_local, schedule="vmap", local_params="^head/")
  state = algo.init(*tiny_params, num_clients=4, client_store="host")
  with pytest.raises(ValueError, match="4 client rows but the data has 5 clients"):
    algo.apply(state, tiny_data, np.array([0]), jax.random.PRNGKey(0))


@pytest.mark.parametrize("where", ["host", "disk"])
def test_host_store_checkpoint_resumes_bit_for_bit(tiny_local, tiny_data, tiny_params, tmp_path, where):
  algo = ftl.FedAvg(tiny_local, schedule="vmap", local_params="^head/")
  kind = "host" if where == "host" else f"disk:{tmp_path / 'rows'}"
  full = _run(algo, algo.init(*tiny_params, num_clients=5, client_store=kind), tiny_data)
  # the run that saves after round 2, then goes on one round (its disk files move past the checkpoint) and dies
  state = _run(algo, algo.init(*tiny_params, num_clients=5, client_store=kind), tiny_data, COHORTS[:2])
  ck = Checkpointer(str(tmp_path / "work"), {"seed": 0})
  assert ck.maybe_save(state)
  _run(algo, state, tiny_data, COHORTS[2:])
  template = algo.init(*tiny_params, num_clients=5, client_store=kind)
  restored = ck.restore(template)
  ck.close()
  assert restored.clients is template.clients and int(restored.round) == 2
  resumed = algo.apply(restored, tiny_data, COHORTS[2], jax.random.PRNGKey(2))[0]
  _equal(resumed.params, full.params)
  _equal(dict(resumed.clients), dict(full.clients))


def test_host_data_matches_device_data_bit_for_bit(tiny_local, tiny_data, tiny_params):
  algo = ftl.FedAvg(tiny_local, schedule="vmap")
  host = _host_twin(tiny_data)
  same_size = [np.array([0, 2]), np.array([1, 3]), np.array([3, 4])]  # one compiled round each
  a = _run(algo, algo.init(*tiny_params), tiny_data, same_size)
  b = _run(algo, algo.init(*tiny_params), host, same_size)
  _equal(a.params, b.params)
  # the round's arrays: only the cohort's padded slots, in the cohort's order
  cohort = host.cohort([1, 3], pad_clients_to=3)
  x, y, c = host.round_arrays(cohort)
  assert x.shape == (3 * host.pad_size, 8, 8, 1) and isinstance(x, jax.Array)
  np.testing.assert_array_equal(np.asarray(x)[np.asarray(c.indices)],
                                np.asarray(tiny_data.x)[np.asarray(cohort.indices)])
  _equal(host.gather(cohort), tiny_data.gather(cohort))
  # prefetch: the next round's cohort gathered ahead gives the same arrays
  host.prefetch(cohort)
  _equal(host.round_arrays(cohort), (x, y, c))
  x0, y0, c0 = tiny_data.round_arrays(cohort)
  assert x0 is tiny_data.x and c0 is cohort


def test_host_data_on_memmap_and_evaluate(tiny_local, tiny_data, tiny_params, tmp_path):
  xs = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype=np.uint8, shape=tiny_data.x.shape)
  xs[:] = np.asarray(tiny_data.x)
  ds = ftl.Dataset(xs, np.asarray(tiny_data.y), 3)
  host = HostFederatedData.from_partition(ds, tiny_data.client_indices)
  assert isinstance(host.x, np.memmap)
  algo = ftl.FedAvg(tiny_local, schedule="vmap", local_params="^head/")
  a = _run(algo, algo.init(*tiny_params, num_clients=5), tiny_data)
  b = _run(algo, algo.init(*tiny_params, num_clients=5, client_store="host"), host)
  _equal(a.params, b.params)
  model = tiny_local.model
  want = ftl.evaluate(model, a.full_params(), a.model_state, tiny_data.x, tiny_data.y, batch_size=16)
  got = ftl.evaluate(model, a.full_params(), a.model_state, host.x, host.y, batch_size=16)  # batches from numpy
  assert got == want
  _, test = host.split_clients(0.3)
  with pytest.raises(ValueError, match=r"to_device\(\)"):
    ftl.evaluate_per_client(model, a.full_params(), a.model_state, test)
  dev_test = test.to_device()
  assert isinstance(dev_test, FederatedData) and not isinstance(dev_test, HostFederatedData)
  ftl.evaluate_per_client(model, a.full_params(), a.model_state, dev_test)


def test_run_rounds_prefetches_host_data_and_matches_device_data(tiny_local, tiny_data, tiny_params, monkeypatch):
  """run_rounds draws the next round's cohort one round early and gathers it in the prefetch thread: every round
  after the first reads prefetched examples, the sampler and the dropouts are called once per round, and the run
  equals the on-device run bit for bit; a host store's every-client models read its rows (all_client_params)."""
  import threading

  host = HostFederatedData(np.asarray(tiny_data.x), np.asarray(tiny_data.y), tiny_data.client_indices, 3)
  threads, calls = [], []
  real = HostFederatedData._host_gather

  def spy(self, indices):
    threads.append(threading.current_thread().name)
    return real(self, indices)

  monkeypatch.setattr(HostFederatedData, "_host_gather", spy)

  def sampler(key, r):
    calls.append(r)
    return np.array([0, 1, 3]) if r % 2 else np.array([1, 2, 4])

  drop = ftl.dropouts(0.3, seed=1)
  algo = ftl.FedAvg(tiny_local, schedule="sequential", local_params="^head/")
  runs = {}
  for name, data in (("device", tiny_data), ("host", host)):
    calls.clear()
    s0 = algo.init(*tiny_params, num_clients=5, client_store="host" if name == "host" else "device")
    runs[name] = ftl.run_rounds(algo, s0, data, rounds=4, seed=0, sampler=sampler, reported=drop)[0]
    assert calls == [0, 1, 2, 3]
  assert sum(t.startswith("fedjax_tl-prefetch") for t in threads) == 3 and len(threads) == 4
  for a, b in zip(jax.tree.leaves(runs["host"].params), jax.tree.leaves(runs["device"].params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(runs["host"].all_client_params()),
                  jax.tree.leaves(runs["device"].all_client_params()), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
