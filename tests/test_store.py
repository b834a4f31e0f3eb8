"""The per-client state store: gather the cohort's rows, scatter them back, nothing else moves."""

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_tl
from fedjax_tl import store


def test_gather_and_scatter_touch_only_the_cohort():
  one = {"c": jnp.zeros(2), "n": jnp.int32(0)}
  s = store.population(one, 5)
  assert s["c"].shape == (5, 2) and s["n"].shape == (5,)
  ids = jnp.array([3, 1])
  rows = jnp.array([3, 1, 0])  # a padded cohort: the padding row reads client 0
  got = store.gather(s, rows, 5)
  assert got["c"].shape == (3, 2)
  new = {"c": jnp.arange(6.0).reshape(3, 2), "n": jnp.array([7, 8, 9], jnp.int32)}
  out = store.scatter(s, ids, new)
  want_c = np.zeros((5, 2))
  want_c[3], want_c[1] = [0, 1], [2, 3]  # the padding row (9) is dropped
  np.testing.assert_array_equal(out["c"], want_c)
  np.testing.assert_array_equal(out["n"], [0, 8, 0, 7, 0])
  assert store.gather(None, rows, 5) is None


def test_wrong_population_is_refused():
  s = store.population({"c": jnp.zeros(2)}, 4)
  try:
    store.gather(s, jnp.array([0]), 5, "control variates")
  except ValueError as e:
    assert "4 control variates" in str(e) and "5 clients" in str(e)
  else:
    raise AssertionError("no error")


def test_local_model_state_with_a_stateless_model(tiny_local, tiny_data, tiny_params):
  # FedBN mode on a model without BatchNorm: nothing is kept per client, and the round runs (it used to fail
  # indexing the empty store).
  algo = fedjax_tl.FedAvg(tiny_local, schedule="vmap", model_state="local")
  state = algo.init(*tiny_params, num_clients=tiny_data.num_clients)
  state, _ = algo.apply(state, tiny_data, np.array([0, 2]), jax.random.PRNGKey(0))
  assert int(state.round) == 1
