"""Participation and work as inputs of the round: dropouts (``reported``) and stragglers (``step_budget``).

Dropouts are checked against the round of the reporting clients alone, stragglers against a plain per-client
loop in which each client trains with its budget as its step count (numpy mean of the deltas)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds


def _same(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("schedule", ["sequential/host:2", "sequential"])
def test_a_client_that_does_not_report_changes_nothing(schedule, tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  key = jax.random.PRNGKey(3)
  # FedPer-style personal head: every client keeps a row, so a dropped client's row must stay as it was.
  algo = FedAvg(tiny_local, schedule=schedule, local_params="^head/")
  s0 = algo.init(params, state, num_clients=tiny_data.num_clients)
  sampled = np.array([0, 1, 3, 4])
  reported = np.array([True, False, True, False])
  s_drop, m_drop = algo.apply(s0, tiny_data, sampled, key, reported=reported)
  s_ref, m_ref = algo.apply(s0, tiny_data, np.array([0, 3]), key)
  _same(s_drop, s_ref)
  for k in ("train_loss", "train_accuracy", "num_examples", "bytes_up", "bytes_down"):
    assert float(m_drop[k]) == float(m_ref[k]), k
  down, up = algo.communication_bytes(s0)
  assert int(m_drop["bytes_up"]) == 2 * up and int(m_drop["bytes_down"]) == 2 * down
  cm = m_drop["client_metrics"]
  np.testing.assert_array_equal(cm["reported"], reported)
  np.testing.assert_array_equal(cm["num_examples"], [7, 0, 9, 0])
  np.testing.assert_array_equal(np.asarray(cm["loss"])[[0, 2]], m_ref["client_metrics"]["loss"])
  # rows of the clients that did not report (1, 4) and of those not sampled (2) are untouched
  for c in (1, 2, 4):
    _same(jax.tree.map(lambda a, c=c: a[c], s_drop.client_params), jax.tree.map(lambda a, c=c: a[c], s0.client_params))
  assert not np.array_equal(s_drop.client_params["head"]["bias"][0], s0.client_params["head"]["bias"][0])


def test_nobody_reports_changes_nothing_but_the_round(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  algo = FedAvg(tiny_local, server_optimizer=optax.adam(0.1), schedule="sequential")  # Adam would move on a 0 step
  s0 = algo.init(params, state)
  s, m = algo.apply(s0, tiny_data, np.array([0, 2]), jax.random.PRNGKey(0), reported=np.array([False, False]))
  _same(s._replace(round=0), s0._replace(round=0))
  assert int(s.round) == 1 and float(m["num_examples"]) == 0 and int(m["bytes_up"]) == 0


def _plain_client_delta(data, model, params, model_state, c, steps, key):
  """One client's delta with ``steps`` local SGD steps: the library's own batching keys, a plain Python loop."""
  local = LocalTraining(model, optax.sgd(0.1), batch_size=4, steps=max(steps, 1))  # the loop runs `steps`
  s = local.init(params, model_state, key, jnp.int32(len(data.client_indices[c])))
  indices = data.cohort([c]).indices[0]
  for t in range(steps):
    s = local.step(s, jnp.int32(t), {}, data.x, data.y, indices)
  return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, params), len(data.client_indices[c])


@pytest.mark.parametrize("schedule", ["sequential/host:2", "vmap"])
def test_a_straggler_runs_its_budget_as_its_step_count(schedule, tiny_data, tiny_model, tiny_params):
  from fedjax_tl import keys

  params, state = tiny_params
  local = LocalTraining(tiny_model, optax.sgd(0.1), batch_size=4, steps=3)
  algo = FedAvg(local, schedule=schedule)
  key = jax.random.PRNGKey(5)
  ids, budget = np.array([0, 1, 3]), np.array([3, 1, 0])
  s, m = algo.apply(algo.init(params, state), tiny_data, ids, key, step_budget=budget)
  deltas = [_plain_client_delta(tiny_data, tiny_model, params, state, c, int(b), keys.client(key, c))
            for c, b in zip(ids, budget, strict=True)]
  total = sum(n for _, n in deltas)
  want = jax.tree.map(lambda p, *d: np.asarray(p) + sum(n * x for x, (_, n) in zip(d, deltas, strict=True)) / total,
                      params, *[d for d, _ in deltas])
  for u, v in zip(jax.tree.leaves(s.params), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)
  # budget 0: the client trained nothing, but it reported (its examples weigh in with a zero delta)
  assert float(m["num_examples"]) == total
  # a budget at or above the client's own steps changes nothing
  big, _ = algo.apply(algo.init(params, state), tiny_data, ids, key, step_budget=np.array([9, 3, 3]))
  plain, _ = algo.apply(algo.init(params, state), tiny_data, ids, key)
  _same(big.params, plain.params)


def test_round_inputs_are_checked(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  algo = FedAvg(tiny_local, schedule="sequential")
  s0 = algo.init(params, state)
  ids = np.array([0, 1])
  with pytest.raises(ValueError, match="one entry per client of the cohort"):
    algo.apply(s0, tiny_data, ids, jax.random.PRNGKey(0), reported=np.array([True]))
  with pytest.raises(TypeError, match="bool array"):
    algo.apply(s0, tiny_data, ids, jax.random.PRNGKey(0), reported=np.array([1, 0]))
  with pytest.raises(ValueError, match="integers >= 0"):
    algo.apply(s0, tiny_data, ids, jax.random.PRNGKey(0), step_budget=np.array([2, -1]))
  with pytest.raises(ValueError, match="integers >= 0"):
    algo.apply(s0, tiny_data, ids, jax.random.PRNGKey(0), step_budget=np.array([2.0, 1.5]))


def test_run_rounds_takes_participation_and_work(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  algo = FedAvg(tiny_local, schedule="sequential")
  sampler = lambda key, r: np.array([0, 1, 3])  # noqa: E731
  seen = []

  def reported(r, ids):
    seen.append((r, ids.tolist()))
    return ids != 1

  s, hist = run_rounds(algo, algo.init(params, state), tiny_data, rounds=2, seed=0, sampler=sampler,
                       reported=reported, step_budget=lambda r, ids: np.full(len(ids), 2))
  assert seen == [(0, [0, 1, 3]), (1, [0, 1, 3])]
  assert hist[0]["client_metrics"]["reported"] == [True, False, True]
  assert hist[0]["num_examples"] == 16


def test_dropouts_and_stragglers_are_replayable_draws():
  import fedjax_tl as ftl

  rep = ftl.dropouts(0.3, seed=1)
  ids = np.arange(2000)
  a, b = rep(4, ids), rep(4, ids[::-1])
  np.testing.assert_array_equal(a, b[::-1])  # a client's draw depends on (seed, round, id) only
  assert 0.25 < 1 - a.mean() < 0.35 and not np.array_equal(a, rep(5, ids))
  budget = ftl.stragglers(0.5, 2, seed=0)(0, ids)
  assert set(np.unique(budget).tolist()) == {2, np.iinfo(np.int32).max} and 0.45 < (budget == 2).mean() < 0.55
  with pytest.raises(ValueError, match="rate must be in"):
    ftl.dropouts(1.0)
