"""One compilation per configuration: equal algorithm configurations share their traced and compiled programs."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import fedjax_tl


def _counting_sgd(lr):
  """optax.sgd whose update counts how often it is traced (it only runs inside jitted rounds)."""
  base = optax.sgd(lr)
  count = [0]

  def update(g, s, p=None):
    count[0] += 1
    return base.update(g, s, p)

  return optax.GradientTransformation(base.init, update), count


@pytest.mark.parametrize("spec", ["vmap", "sequential/host:2"])
def test_equal_instances_trace_once(spec, tiny_model, tiny_data, tiny_params):
  opt, traces = _counting_sgd(0.1)
  local = fedjax_tl.LocalTraining(tiny_model, opt, batch_size=4, epochs=1)
  a, b = fedjax_tl.FedAvg(local, schedule=spec), fedjax_tl.FedAvg(local, schedule=spec)
  assert a == b and hash(a) == hash(b) and a is not b
  ids, key = np.array([0, 1]), jax.random.PRNGKey(0)
  sa, _ = a.apply(a.init(*tiny_params), tiny_data, ids, key)
  first = traces[0]
  assert first >= 1
  sb, _ = b.apply(b.init(*tiny_params), tiny_data, ids, key)
  assert traces[0] == first  # b reused a's programs
  assert b.runner(tiny_data.pad_size).trace_count == 0
  for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_array_equal(u, v)
  # The client side does not depend on the server optimizer: a FedAvg that differs only there reuses it too.
  c = fedjax_tl.FedAvg(local, schedule=spec, server_optimizer=optax.sgd(0.5))
  c.apply(c.init(*tiny_params), tiny_data, ids, key)
  assert traces[0] == first
  d = fedjax_tl.FedAvg(dataclasses.replace(local, batch_size=2), schedule=spec)  # another configuration
  d.apply(d.init(*tiny_params), tiny_data, ids, key)
  assert traces[0] > first


def test_auto_chunk_resolution_leaves_the_runner_unchanged(tiny_local, tiny_data, tiny_params):
  params, state = tiny_params
  algo = fedjax_tl.FedAvg(tiny_local, schedule="chunked:auto/host:2", memory_budget=1)
  runner = algo.runner(tiny_data.pad_size)
  resolved = runner.resolve(params, {}, state, tiny_data.x, tiny_data.y, 3, budget_bytes=1)
  assert runner.schedule.chunk_size == -1 and resolved.schedule.chunk_size == 1 and resolved is not runner
  assert resolved.resolve(params, {}, state, tiny_data.x, tiny_data.y, 3) is resolved


def test_equal_algorithms_with_hooks_share_programs(tiny_model, tiny_data, tiny_params):
  """Hooks are part of the configuration: equal SCAFFOLDs share every program; a different one retraces."""
  opt, traces = _counting_sgd(0.1)
  local = fedjax_tl.LocalTraining(tiny_model, opt, batch_size=4, epochs=1)
  make = lambda lr: fedjax_tl.FedAvg(local, schedule="vmap", hooks=fedjax_tl.Scaffold(lr))  # noqa: E731
  ids, key = np.array([0, 1]), jax.random.PRNGKey(0)
  a, b = make(0.1), make(0.1)
  a.apply(a.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  first = traces[0]
  b.apply(b.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  assert traces[0] == first and b.runner(tiny_data.pad_size).trace_count == 0
  c = make(0.2)
  c.apply(c.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  assert traces[0] > first
