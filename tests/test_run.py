"""The run layer: run_rounds keeps every metric and takes any client sampler; checkpoints of any state pytree."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_tl


def test_run_rounds_keeps_all_metrics_and_uses_the_sampler(tiny_local, tiny_data, tiny_params):
  algo = fedjax_tl.FedAvg(tiny_local, schedule="sequential")
  cohorts = {0: [4, 1], 1: [0, 2, 3]}
  sampler = lambda key, r: np.array(cohorts[r])  # noqa: E731 (a round-dependent cohort)
  state, hist = fedjax_tl.run_rounds(algo, algo.init(*tiny_params), tiny_data, rounds=2, seed=0, sampler=sampler)
  assert [h["client_ids"] for h in hist] == [[4, 1], [0, 2, 3]]
  # the same rounds by hand: every metric the algorithm returned is in the record, per-client ones as lists
  s = algo.init(*tiny_params)
  for r, rec in enumerate(hist):
    s, m = algo.apply(s, tiny_data, np.array(cohorts[r]), fedjax_tl.keys.round_key(0, r))
    assert set(m) <= set(rec)
    assert rec["client_metrics"]["num_examples"] == np.asarray(m["client_metrics"]["num_examples"]).tolist()
    np.testing.assert_allclose(rec["client_metrics"]["loss"], m["client_metrics"]["loss"], rtol=0)
    assert rec["train_accuracy"] == float(m["train_accuracy"])
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s), strict=True):
    np.testing.assert_array_equal(a, b)


class _OtherState(NamedTuple):  # not a ServerState: fields the Checkpointer has never heard of
  round: jax.Array
  weights: dict
  opt_state: optax.OptState
  per_client: tuple
  nothing: None = None


def test_checkpointer_saves_any_state_pytree(tmp_path):
  w = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2), jnp.bfloat16)}}
  state = _OtherState(jnp.int32(4), w, optax.adam(0.1).init(w), (jnp.arange(5), jnp.zeros((5, 2), jnp.uint32) + 7))
  ckpt = fedjax_tl.Checkpointer(str(tmp_path), {"seed": 0})
  assert ckpt.maybe_save(state)
  template = jax.tree.map(jnp.zeros_like, state)
  restored = ckpt.restore(template)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
