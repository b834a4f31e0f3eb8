"""The algorithm framework (fedjax_tl.Hooks, per-client state, messages), tested through algorithms written on
the public API against plain per-client reference loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl

LR, STEPS = 0.1, 3


def _grad_fn(model):
  """Full-batch gradient of a client's mean cross-entropy (batch 16 >= every tiny client: one batch per step)."""

  def loss(p, x, y):
    logits, _ = model.apply(p, {}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(jax.grad(loss))


def _wmean(trees, ws):
  return jax.tree.map(lambda *a: sum(w * t for w, t in zip(ws, a)) / sum(ws), *trees)


def _add_scaled(x, y, s):
  return jax.tree.map(lambda a, b: a + s * b, x, y)


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-6), a, b)


def _scaffold_reference(model, params, data, cohorts, n_pop, option="II"):
  """SCAFFOLD option II (Karimireddy et al. 2020, Alg. 1) as a plain loop; the model delta's mean weighted by
  examples (the library's Mean()), the control variates' sum unweighted."""
  grad = _grad_fn(model)
  zeros = jax.tree.map(jnp.zeros_like, params)
  x, c, ci = params, zeros, {i: zeros for i in range(n_pop)}
  for ids in cohorts:
    deltas, dcs, ws = [], [], []
    for i in ids:
      idx = np.asarray(data.client_indices[i])
      xi, yi = data.x[idx], data.y[idx]
      y = x
      for _ in range(STEPS):
        g = grad(y, xi, yi)
        y = jax.tree.map(lambda p, g_, c_, ci_: p - LR * (g_ + c_ - ci_), y, g, c, ci[i])
      if option == "I":  # c_i+ = g_i(x): full batch here, so the gradient at the server model
        new = grad(x, xi, yi)
      else:
        new = jax.tree.map(lambda ci_, c_, x_, y_: ci_ - c_ + (x_ - y_) / (STEPS * LR), ci[i], c, x, y)
      deltas.append(jax.tree.map(jnp.subtract, y, x))
      dcs.append(jax.tree.map(jnp.subtract, new, ci[i]))
      ws.append(len(yi))
      ci[i] = new
    x = _add_scaled(x, _wmean(deltas, ws), 1.0)
    c = _add_scaled(c, _wmean(dcs, [1.0] * len(dcs)), len(ids) / n_pop)  # c += 1/N sum_S delta_c, unweighted
  return x, c, ci


@pytest.mark.parametrize("option", ["II", "I"])
def test_scaffold_matches_a_plain_reference_loop_for_two_rounds(option, tiny_model, tiny_data, tiny_params):
  params, _ = tiny_params
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=16, steps=STEPS)
  algo = ftl.FedAvg(local, schedule="vmap", hooks=ftl.Scaffold(LR, option=option))
  state = algo.init(params, num_clients=tiny_data.num_clients)
  cohorts = [[0, 1, 3], [1, 2, 4]]
  for r, ids in enumerate(cohorts):
    state, metrics = algo.apply(state, tiny_data, np.array(ids), jax.random.PRNGKey(r))
  x, c, ci = _scaffold_reference(tiny_model, params, tiny_data, cohorts, tiny_data.num_clients, option)
  close = _close
  close(state.params, x)
  close(state.algorithm_state, c)
  for i in range(tiny_data.num_clients):
    close(jax.tree.map(lambda a, i=i: a[i], state.algorithm_clients), ci[i])
  # The control variates travel both ways: twice FedAvg's bytes.
  plain_down, plain_up = ftl.FedAvg(local, schedule="vmap").communication_bytes(state)
  assert algo.communication_bytes(state) == (2 * plain_down, 2 * plain_up)
  assert int(metrics["bytes_up"]) == 3 * 2 * plain_up


def test_scaffold_round_one_is_fedavg_bit_for_bit(tiny_local, tiny_data, tiny_params):
  ids, key = np.array([0, 2, 3]), jax.random.PRNGKey(3)
  scaffold = ftl.FedAvg(tiny_local, schedule="vmap", hooks=ftl.Scaffold(0.1))
  plain = ftl.FedAvg(tiny_local, schedule="vmap")
  a, _ = scaffold.apply(scaffold.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  b, _ = plain.apply(plain.init(*tiny_params), tiny_data, ids, key)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def _two_rounds(algo, data, params, ids=((0, 2, 3), (1, 2, 4))):
  state = algo.init(*params, num_clients=data.num_clients)
  for r, cohort in enumerate(ids):
    state, _ = algo.apply(state, data, np.array(cohort), jax.random.PRNGKey(r))
  return state


def test_scaffold_under_dp_fedavg_without_clip_or_noise_is_scaffold_bit_for_bit(tiny_local, tiny_data, tiny_params):
  # SCAFFOLD's control-variate update now goes through the aggregator with the delta (aggregators.Message):
  # DPFedAvg clips the two jointly and noises both. With an infinite clip and no noise it is SCAFFOLD under the
  # uniform mean (DPFedAvg's weighting) exactly: the clip scales by exactly 1.0 and the sums are the same.
  scaffold = ftl.Scaffold(0.1)
  dp = ftl.FedAvg(tiny_local, schedule="vmap", hooks=scaffold,
                  aggregator=ftl.DPFedAvg(clip=float("inf"), noise_multiplier=0.0))
  plain = ftl.FedAvg(tiny_local, schedule="vmap", hooks=scaffold, aggregator=ftl.aggregators.UniformMean())
  a, b = _two_rounds(dp, tiny_data, tiny_params), _two_rounds(plain, tiny_data, tiny_params)
  for got, want in [(a.params, b.params), (a.algorithm_state, b.algorithm_state), (a.clients, b.clients)]:
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert jax.tree.leaves(a.algorithm_state) and any(np.any(np.asarray(c) != 0) for c in jax.tree.leaves(a.clients))
  # A finite clip and noise change both the model and the control variates (the message is covered).
  noisy = _two_rounds(ftl.FedAvg(tiny_local, schedule="vmap", hooks=scaffold,
                                 aggregator=ftl.DPFedAvg(clip=0.01, noise_multiplier=1.0, cohort_size=3)),
                      tiny_data, tiny_params)
  assert all(np.any(np.asarray(x) != np.asarray(y))
             for x, y in zip(jax.tree.leaves(noisy.algorithm_state), jax.tree.leaves(b.algorithm_state)))


def test_fednova_under_secure_aggregation_is_fednova_within_the_fixed_point_bound(tiny_local, tiny_data,
                                                                                   tiny_params):
  # FedNova's norms are summed through secure aggregation's masked field sum with the delta. Each client's value
  # is off by less than 1/scale per coordinate after stochastic rounding (the mean part also times the largest
  # weight), so the mean delta is off by at most n * max_weight / (scale * W) and tau_eff = A / W by at most
  # (n / scale) * (1 + tau) / W; the new params, tau_eff * mean, by tau * e_mean + |mean| * e_tau, with
  # 1 <= tau <= T (the local steps) and |mean| <= the plain run's largest change.
  ids, key, r = np.array([0, 1, 3]), jax.random.PRNGKey(3), 100.0
  hooks = ftl.FedNova()
  secure = ftl.FedAvg(tiny_local, schedule="vmap", hooks=hooks, aggregator=ftl.SecureAggregation(clip_value=r))
  plain = ftl.FedAvg(tiny_local, schedule="vmap", hooks=hooks)
  start = plain.init(*tiny_params, num_clients=5)
  a, _ = secure.apply(secure.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  b, _ = plain.apply(start, tiny_data, ids, key)
  from fedjax_tl.aggregators.secure import fixed_point_scale
  n, scale = len(ids), fixed_point_scale(len(ids), r)
  weights, t_max = tiny_data.client_sizes[ids].astype(np.float64), tiny_local.num_steps(tiny_data.pad_size)
  max_weight, total = float(tiny_data.pad_size), weights.sum()
  e_mean = n * max_weight / (scale * total)
  e_tau = n / scale * (1 + t_max) / total
  for p, q, p0 in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), jax.tree.leaves(start.params)):
    change = float(np.max(np.abs(np.asarray(q) - np.asarray(p0))))
    bound = t_max * e_mean + change * e_tau
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5, atol=bound)
  assert any(np.any(np.asarray(p) != np.asarray(q)) for p, q in zip(jax.tree.leaves(a.params),
                                                                     jax.tree.leaves(b.params)))


def test_hooks_with_a_message_refuse_an_aggregator_that_takes_no_message(tiny_local, tiny_params):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Legacy(ftl.aggregators.Mean):  # an aggregator written for a bare delta
    takes_message = False

  algo = ftl.FedAvg(tiny_local, hooks=ftl.Scaffold(0.1), aggregator=Legacy("uniform"))
  with pytest.raises(ValueError, match="takes_message"):
    algo.init(*tiny_params, num_clients=5)
  with pytest.raises(ValueError, match="num_clients"):
    ftl.FedAvg(tiny_local, hooks=ftl.Scaffold(0.1)).init(*tiny_params)


def test_ditto_matches_a_plain_reference_loop_for_two_rounds(tiny_model, tiny_data, tiny_params):
  params, _ = tiny_params
  lam, cohorts = 0.5, [[0, 1, 3], [1, 2, 4]]
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=16, steps=STEPS)
  algo = ftl.Ditto(local, lam=lam, schedule="vmap")
  state = algo.init(params, num_clients=tiny_data.num_clients)
  for r, ids in enumerate(cohorts):
    state, metrics = algo.apply(state, tiny_data, np.array(ids), jax.random.PRNGKey(r))
  # Reference (Li et al. 2021, Alg. 1): global FedAvg; personal v_k <- v_k - lr (grad F_k(v_k) + lam (v_k - w^t)).
  grad = _grad_fn(tiny_model)
  w, v = params, {i: params for i in range(tiny_data.num_clients)}
  for ids in cohorts:
    deltas, ws = [], []
    for i in ids:
      idx = np.asarray(tiny_data.client_indices[i])
      xi, yi = tiny_data.x[idx], tiny_data.y[idx]
      y = w
      for _ in range(STEPS):
        y = jax.tree.map(lambda p, g: p - LR * g, y, grad(y, xi, yi))
        v[i] = jax.tree.map(lambda p, g, a: p - LR * (g + lam * (p - a)), v[i], grad(v[i], xi, yi), w)
      deltas.append(jax.tree.map(jnp.subtract, y, w))
      ws.append(len(yi))
    w = _add_scaled(w, _wmean(deltas, ws), 1.0)
  close = _close
  close(state.full_params(), w)
  personal = state.personal_params()
  for i in range(tiny_data.num_clients):
    close(jax.tree.map(lambda a, i=i: a[i], personal), v[i])
  assert metrics["bytes_up"] == 3 * algo.communication_bytes(state)[1]  # the personal pass sends nothing


def test_ditto_checkpoint_and_resume_is_bit_exact(tmp_path, tiny_local, tiny_data, tiny_params):
  algo = ftl.Ditto(tiny_local, lam=0.1, schedule="vmap")
  fresh = lambda: algo.init(*tiny_params, num_clients=tiny_data.num_clients)  # noqa: E731
  straight, _ = ftl.run_rounds(algo, fresh(), tiny_data, rounds=3, cohort_size=3, seed=7)
  first, _ = ftl.run_rounds(algo, fresh(), tiny_data, rounds=2, cohort_size=3, seed=7)
  ftl.Checkpointer(str(tmp_path), {"algorithm": "ditto"}).maybe_save(first)
  restored = ftl.Checkpointer(str(tmp_path), {"algorithm": "ditto"}).restore(fresh())
  assert int(restored.round) == 2
  resumed, history = ftl.run_rounds(algo, restored, tiny_data, rounds=1, cohort_size=3, seed=7)
  assert [h["round"] for h in history] == [3]
  pairs = zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True)
  for a, b in pairs:
    np.testing.assert_array_equal(a, b)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.personal), jax.tree.leaves(resumed.personal))]
  assert any(moved)  # the third round changed the personal models: they were restored, not re-initialised


def test_hook_message_bits_are_traced_once_per_state_shape(tiny_local, tiny_data, tiny_params):
  import dataclasses

  traced = []

  @dataclasses.dataclass(frozen=True)
  class Counting(ftl.Hooks):
    """Sends a 3-float message; counts how often its finish is traced."""

    def finish(self, delta, params, state, ctx, steps):
      traced.append(1)
      return delta, jnp.zeros(3), ctx.client_state

  algo = ftl.FedAvg(tiny_local, schedule="vmap", hooks=Counting())
  state = algo.init(*tiny_params)
  base = ftl.FedAvg(tiny_local, schedule="vmap").communication_bits(state)
  n = len(traced)
  bits = [algo.communication_bits(state) for _ in range(3)]
  assert bits == [(base[0], base[1] + 3 * 32)] * 3
  assert len(traced) == n + 1  # once, then the cached figure


def test_ditto_takes_the_global_models_transforms_and_round_inputs(tiny_local, tiny_data, tiny_params):
  """Ditto's global half is FedAvg with any aggregator / uplink transform: with them its global model is that FedAvg's
  bit for bit, and the personal pass (which sends nothing) is unchanged; a client that does not report keeps its
  personal model."""
  import fedjax_tl as ftl

  params, state = tiny_params
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(4)
  topk = ftl.compression.top_k(0.5)
  ditto = ftl.Ditto(tiny_local, 0.1, schedule="sequential", aggregator=ftl.UniformMean(), client_transform=topk)
  plain = ftl.Ditto(tiny_local, 0.1, schedule="sequential")
  fed = ftl.FedAvg(tiny_local, schedule="sequential", aggregator=ftl.UniformMean(), client_transform=topk)
  s, m = ditto.apply(ditto.init(params, state, num_clients=5), tiny_data, ids, key)
  s_plain, m_plain = plain.apply(plain.init(params, state, num_clients=5), tiny_data, ids, key)
  s_fed, m_fed = fed.apply(fed.init(params, state), tiny_data, ids, key)
  jax.tree.map(np.testing.assert_array_equal, s.server.params, s_fed.params)
  jax.tree.map(np.testing.assert_array_equal, s.personal_params(), s_plain.personal_params())
  assert int(m["bytes_up"]) == int(m_fed["bytes_up"]) < int(m_plain["bytes_up"])
  s2, _ = ditto.apply(s, tiny_data, ids, key, reported=np.array([True, False, True]))
  mine = lambda st: jax.tree.map(lambda a: np.asarray(a[1]), st.personal_params())  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, mine(s2), mine(s))


def test_ditto_in_one_pass_is_ditto(tiny_model, tiny_data, tiny_params):
  """DittoOnePass (FedAvg + hooks, one pass over the data) equals Ditto (two FedAvg rounds) for a model without
  BatchNorm: the same global model and personal models after two rounds."""
  from fedjax_tl.algorithms import ditto

  params, _ = tiny_params
  local = ftl.LocalTraining(tiny_model, optax.sgd(LR), batch_size=4, steps=STEPS)
  two = ftl.Ditto(local, lam=0.5, schedule="sequential")
  one = ftl.FedAvg(local, schedule="sequential", hooks=ditto.DittoOnePass(0.5, LR))
  s2, s1 = two.init(params, num_clients=tiny_data.num_clients), one.init(params, num_clients=tiny_data.num_clients)
  for r, ids in enumerate([[0, 1, 3], [1, 2, 4]]):
    s2, _ = two.apply(s2, tiny_data, np.array(ids), jax.random.PRNGKey(r))
    s1, _ = one.apply(s1, tiny_data, np.array(ids), jax.random.PRNGKey(r))
  _close(s1.full_params(), s2.full_params())
  _close(ditto.personal_params(s1), s2.personal_params())
