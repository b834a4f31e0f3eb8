"""FedDyn, FedNova and FedRep (fedjax_tl.algorithms) against plain reference loops and their limiting cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl
from fedjax_tl.core.params import split_params

LR, STEPS = 0.1, 3


def _client(data, i):
  idx = np.asarray(data.client_indices[i])
  return data.x[idx], data.y[idx]


def _grad_fn(model):
  def loss(p, x, y):
    logits, _ = model.apply(p, {}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(jax.grad(loss))


def _close(a, b, rtol=2e-4, atol=2e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _add(x, y, s=1.0):
  return jax.tree.map(lambda a, b: a + s * b, x, y)


def _wmean(trees, ws):
  return jax.tree.map(lambda *a: sum(w * t for w, t in zip(ws, a)) / sum(ws), *trees)


def test_feddyn_matches_the_papers_algorithm_for_two_rounds(tiny_model, tiny_data, tiny_params):
  params, _ = tiny_params
  alpha, cohorts, n = 0.05, [[0, 1, 3], [1, 2, 4]], tiny_data.num_clients
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=16, steps=STEPS)
  algo = ftl.FedAvg(local, schedule="vmap", hooks=ftl.FedDyn(alpha))
  state = algo.init(params, num_clients=n)
  for r, ids in enumerate(cohorts):
    state, _ = algo.apply(state, tiny_data, np.array(ids), jax.random.PRNGKey(r))
  # Acar et al. 2021, Algorithm 1 (cohort means weighted by examples, the library's Mean()).
  grad, zeros = _grad_fn(tiny_model), jax.tree.map(jnp.zeros_like, params)
  w, h, g = params, zeros, {i: zeros for i in range(n)}
  for ids in cohorts:
    deltas, ws = [], []
    for i in ids:
      x, y = _client(tiny_data, i)
      v = w
      for _ in range(STEPS):
        step = jax.tree.map(lambda gr, gi, a, b: gr - gi + alpha * (a - b), grad(v, x, y), g[i], v, w)
        v = _add(v, step, -LR)
      deltas.append(_add(v, w, -1.0))
      g[i] = _add(g[i], deltas[-1], -alpha)
      ws.append(len(y))
    mean = _wmean(deltas, ws)
    h = _add(h, mean, -alpha * len(ids) / n)
    w = _add(_add(w, mean), h, -1.0 / alpha)
  _close(state.params, w)
  _close(state.algorithm_state, h)
  for i in range(n):
    _close(jax.tree.map(lambda a, i=i: a[i], state.algorithm_clients), g[i])


def test_feddyn_with_alpha_zero_is_fedavg_bit_for_bit(tiny_local, tiny_data, tiny_params):
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(1)
  dyn, plain = ftl.FedAvg(tiny_local, schedule="vmap", hooks=ftl.FedDyn(0.0)), ftl.FedAvg(tiny_local, schedule="vmap")
  s_dyn, s_plain = dyn.init(*tiny_params, num_clients=5), plain.init(*tiny_params)
  for r in range(2):
    s_dyn, _ = dyn.apply(s_dyn, tiny_data, ids, jax.random.fold_in(key, r))
    s_plain, _ = plain.apply(s_plain, tiny_data, ids, jax.random.fold_in(key, r))
  jax.tree.map(np.testing.assert_array_equal, s_dyn.params, s_plain.params)


def test_fednova_normalises_each_clients_update_by_its_steps(tiny_local, tiny_data, tiny_params):
  """Clients of 7, 12 and 9 examples, batch 4, 2 epochs: tau = 4, 6 and 6 local steps. Reference: each client's
  delta from a one-client FedAvg round, combined by Wang et al.'s rule tau_eff * sum_i p_i delta_i / tau_i."""
  ids, key = [0, 1, 3], jax.random.PRNGKey(2)
  nova = ftl.FedAvg(tiny_local, schedule="vmap", hooks=ftl.FedNova())
  state, metrics = nova.apply(nova.init(*tiny_params), tiny_data, np.array(ids), key)
  plain = ftl.FedAvg(tiny_local, schedule="vmap")
  sizes = tiny_data.client_sizes[ids]
  tau = 2 * -(-sizes // 4)
  assert list(tau) == [4, 6, 6]
  p = sizes / sizes.sum()
  deltas = []
  for c in ids:
    one, _ = plain.apply(plain.init(*tiny_params), tiny_data, np.array([c]), key)
    deltas.append(_add(one.params, tiny_params[0], -1.0))
  expected = _add(tiny_params[0], _wmean([jax.tree.map(lambda d, t=t: d / t, d) for d, t in zip(deltas, tau)], p),
                  float((p * tau).sum()))
  _close(state.params, expected, rtol=1e-4, atol=1e-6)
  assert metrics["bytes_up"] == 3 * (plain.communication_bytes(state)[1] + 8)  # + two float32 per client


def test_fedrep_trains_the_head_then_the_body(tiny_model, tiny_data, tiny_params):
  params, _ = tiny_params
  head_steps, ids = 1, [0, 3]
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=16, steps=STEPS)
  algo = ftl.fedrep(local, head_steps=head_steps, schedule="vmap")
  state, metrics = algo.apply(algo.init(params, num_clients=5), tiny_data, np.array(ids), jax.random.PRNGKey(0))
  grad = _grad_fn(tiny_model)
  heads, bodies, ws = {}, [], []
  for i in ids:
    x, y = _client(tiny_data, i)
    v = params
    for t in range(STEPS):
      head_g, body_g = split_params(grad(v, x, y), "^head/")
      head, body = split_params(v, "^head/")
      head = _add(head, head_g, -LR) if t < head_steps else head
      body = _add(body, body_g, -LR) if t >= head_steps else body
      v = {**body, **head}
    heads[i], body = split_params(v, "^head/")
    bodies.append(body)
    ws.append(len(y))
  _close(state.params, _wmean(bodies, ws))
  for i in ids:
    _close(jax.tree.map(lambda a, i=i: a[i], state.client_params), heads[i])
  assert metrics["bytes_up"] == 2 * 4 * sum(a.size for a in jax.tree.leaves(state.params))  # the body only


def test_fedrep_with_only_head_steps_keeps_the_body_fixed(tiny_local, tiny_data, tiny_params):
  algo = ftl.fedrep(tiny_local, head_steps=10**6, schedule="vmap")
  s0 = algo.init(*tiny_params, num_clients=5)
  s1, _ = algo.apply(s0, tiny_data, np.array([0, 1, 2]), jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, s1.params, s0.params)
  assert not np.array_equal(s1.client_params["head"]["kernel"][0], s0.client_params["head"]["kernel"][0])


@pytest.mark.parametrize("name", ["scaffold", "feddyn", "fedrep", "fedper"])
def test_checkpoint_and_resume_is_bit_exact_with_per_client_state(name, tmp_path, tiny_local, tiny_data, tiny_params):
  algo = {"scaffold": ftl.FedAvg(tiny_local, hooks=ftl.Scaffold(0.1), schedule="vmap"),
          "feddyn": ftl.FedAvg(tiny_local, hooks=ftl.FedDyn(0.1), schedule="vmap"),
          "fedrep": ftl.fedrep(tiny_local, head_steps=2, schedule="vmap"),
          "fedper": ftl.fedper(tiny_local, schedule="vmap")}[name]
  fresh = lambda: algo.init(*tiny_params, num_clients=tiny_data.num_clients)  # noqa: E731
  straight, _ = ftl.run_rounds(algo, fresh(), tiny_data, rounds=3, cohort_size=2, seed=3)
  first, _ = ftl.run_rounds(algo, fresh(), tiny_data, rounds=2, cohort_size=2, seed=3)
  ftl.Checkpointer(str(tmp_path), {"algorithm": name}).maybe_save(first)
  restored = ftl.Checkpointer(str(tmp_path), {"algorithm": name}).restore(fresh())
  resumed, _ = ftl.run_rounds(algo, restored, tiny_data, rounds=1, cohort_size=2, seed=3)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_ditto_personal_models_approach_the_global_one_as_lambda_grows(tiny_model, tiny_data, tiny_params):
  """lam = 0: purely local models; lr * lam = 1: every personal step restarts from the global model, so the
  personal model ends one gradient step away from it."""
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=16, steps=STEPS)
  dist = []
  for lam in (0.0, 5.0, 1.0 / LR):
    algo = ftl.Ditto(local, lam=lam, schedule="vmap")
    state, _ = algo.apply(algo.init(tiny_params[0], num_clients=5), tiny_data, np.arange(5), jax.random.PRNGKey(0))
    w, v = tiny_params[0], state.personal_params()  # personal steps pull to the model broadcast this round
    dist.append(sum(float(jnp.sum((b - a[None]) ** 2)) for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(v))))
  assert dist[0] > dist[1] > dist[2] > 0
