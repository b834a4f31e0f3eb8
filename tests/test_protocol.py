"""The algorithm protocol's newer parts: starting candidates (IFCA), hooks that see the server state, composed
hooks, skipped steps and per-client metrics; each against FedAvg bit for bit where it reduces to it, or against a
plain per-client loop written here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl
from fedjax_tl import keys
from fedjax_tl.algorithms import ifca as ifca_mod
from fedjax_tl.core.client import LocalTraining


def _same(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _close(a, b, rtol=2e-5, atol=2e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _rounds(algo, state, data, ids, rounds=2, seed=1):
  for r in range(rounds):
    state, m = algo.apply(state, data, ids, jax.random.fold_in(jax.random.PRNGKey(seed), r))
  return state, m


# Bit for bit where the clients' sums are their own program (the host loop, CPU's default for convolutional
# models); in a one-program round (vmap) the extra message is one more output of the same XLA program, whose
# fusion then rounds the cohort's weighted sum differently by up to an ulp.
SCHEDULES = [("sequential/host:2", _same), ("vmap", lambda a, b: _close(a, b, rtol=1e-6, atol=1e-7))]


@pytest.mark.parametrize(("schedule", "equal"), SCHEDULES)
def test_ifca_with_one_model_is_fedavg_bit_for_bit(schedule, equal, tiny_data, tiny_local, tiny_params):
  ids = np.array([0, 1, 3])
  ifca = ftl.FedAvg(tiny_local, schedule=schedule, hooks=ftl.IFCA(num_models=1))
  plain = ftl.FedAvg(tiny_local, schedule=schedule)
  s_ifca, m = _rounds(ifca, ifca.init(*tiny_params), tiny_data, ids)
  s_plain, m_plain = _rounds(plain, plain.init(*tiny_params), tiny_data, ids)
  equal(s_ifca.params, s_plain.params)
  np.testing.assert_array_equal(m["client_metrics"]["cluster"], 0)
  assert float(m["train_loss"]) == pytest.approx(float(m_plain["train_loss"]), rel=1e-6)
  down, up = ifca.communication_bits(s_ifca)
  assert (down, up) == (plain.communication_bits(s_plain)[0], plain.communication_bits(s_plain)[1] + 32)


def _first_batch_loss(local, params, model_state, data, c, key):
  s = local.init(params, model_state, key, jnp.int32(len(data.client_indices[c])))
  idx, mask, _ = local.batch(s, jnp.int32(0), data.cohort([c]).indices[0])
  logits, _ = local.model.apply(params, model_state, data.x[idx], train=False, mask=mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  m = np.asarray(mask, np.float64)
  return float(-(np.take_along_axis(np.asarray(logp), np.asarray(data.y[idx])[:, None], 1)[:, 0] * m).sum() / m.sum())


def _train(local, params, model_state, data, c, key):
  s = local.init(params, model_state, key, jnp.int32(len(data.client_indices[c])))
  indices = data.cohort([c]).indices[0]
  for t in range(local.num_steps(data.pad_size)):
    s = local.step(s, jnp.int32(t), {}, data.x, data.y, indices)
  return s.params


@pytest.mark.parametrize("schedule", ["vmap", "sequential/host:2"])
def test_ifca_clients_pick_the_best_model_and_each_model_averages_its_clients(schedule, tiny_data, tiny_model,
                                                                              tiny_params):
  params, model_state = tiny_params
  local = LocalTraining(tiny_model, optax.sgd(0.1), batch_size=4, steps=2)
  hooks = ftl.IFCA(num_models=3, init_scale=0.3, seed=0)  # clients choose models 1, 1, 2, 0
  algo = ftl.FedAvg(local, schedule=schedule, hooks=hooks)
  s0 = algo.init(params, model_state)
  ids, key = np.array([0, 1, 2, 3]), jax.random.PRNGKey(7)
  s, m = algo.apply(s0, tiny_data, ids, key)
  # plain reference: losses on the first batch, argmin, train from it, per-model weighted means
  models = ifca_mod.models(s0)
  k = 3
  cand = [jax.tree.map(lambda a, j=j: a[j], models) for j in range(k)]
  choice, new = [], {}
  for c in ids:
    ck = keys.client(key, c)
    losses = [_first_batch_loss(local, p, model_state, tiny_data, c, ck) for p in cand]
    j = int(np.argmin(losses))
    choice.append(j)
    trained = _train(local, cand[j], model_state, tiny_data, c, ck)
    new.setdefault(j, []).append((jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), trained, cand[j]),
                                  len(tiny_data.client_indices[c])))
  np.testing.assert_array_equal(m["client_metrics"]["cluster"], choice)
  assert len(set(choice)) > 1, choice  # the test must exercise more than one model
  want = []
  for j in range(k):
    if j not in new:
      want.append(cand[j])
      continue
    total = sum(n for _, n in new[j])
    want.append(jax.tree.map(lambda p, *d, j=j, total=total: np.asarray(p) + sum(
        n * x for x, (_, n) in zip(d, new[j], strict=True)) / total, cand[j], *[d for d, _ in new[j]]))
  got = ifca_mod.models(s)
  for j in range(k):
    _close(jax.tree.map(lambda a, j=j: a[j], got), want[j])


@pytest.mark.parametrize(("schedule", "equal"), SCHEDULES)
def test_mimelite_beta_zero_is_fedavg_bit_for_bit(schedule, equal, tiny_data, tiny_local, tiny_params):
  ids = np.array([0, 1, 3])
  mime = ftl.FedAvg(tiny_local, schedule=schedule, hooks=ftl.MimeLite(beta=0.0))
  plain = ftl.FedAvg(tiny_local, schedule=schedule)
  equal(_rounds(mime, mime.init(*tiny_params), tiny_data, ids)[0].params,
        _rounds(plain, plain.init(*tiny_params), tiny_data, ids)[0].params)


def test_mimelite_against_a_plain_loop(tiny_data, tiny_model, tiny_params):
  """Two rounds: clients step with (1 - b) g + b m; m <- (1 - b) weighted mean of first-step gradients + b m."""
  params, model_state = tiny_params
  b, lr = 0.5, 0.1
  local = LocalTraining(tiny_model, optax.sgd(lr), batch_size=4, steps=3)
  algo = ftl.FedAvg(local, schedule="sequential/host:2", hooks=ftl.MimeLite(beta=b))
  ids = np.array([0, 1, 3])
  s = algo.init(params, model_state)
  x = jax.tree.map(np.asarray, params)
  m = jax.tree.map(np.zeros_like, x)
  plain = LocalTraining(tiny_model, optax.sgd(1.0), batch_size=4, steps=3)  # to read raw gradients
  for r in range(2):
    key = jax.random.fold_in(jax.random.PRNGKey(3), r)
    s, _ = algo.apply(s, tiny_data, ids, key)
    deltas, grads0, ns = [], [], []
    for c in ids:
      ck, n = keys.client(key, c), len(tiny_data.client_indices[c])
      st = plain.init(jax.tree.map(jnp.asarray, x), model_state, ck, jnp.int32(n))
      indices = tiny_data.cohort([c]).indices[0]
      y = x
      for t in range(3):
        # the gradient at y on step t's batch: one SGD(1.0) step from y gives y - g
        probe = plain.step(st._replace(params=jax.tree.map(jnp.asarray, y)), jnp.int32(t), {}, tiny_data.x,
                           tiny_data.y, indices)
        g = jax.tree.map(lambda a, p: np.asarray(a) - np.asarray(p), y, probe.params)
        if t == 0:
          grads0.append(g)
        y = jax.tree.map(lambda yy, gg, mm: yy - lr * ((1 - b) * gg + b * mm), y, g, m)
      deltas.append(jax.tree.map(lambda a, c0: a - c0, y, x))
      ns.append(n)
    w = np.asarray(ns, np.float64) / sum(ns)
    x = jax.tree.map(lambda p, *d, w=w: p + sum(wi * di for wi, di in zip(w, d, strict=True)), x, *deltas)
    m = jax.tree.map(lambda mm, *g, w=w: (1 - b) * sum(wi * gi for wi, gi in zip(w, g, strict=True)) + b * mm, m,
                     *grads0)
  _close(s.params, x, rtol=1e-4, atol=1e-5)
  _close(s.algorithm_state, m, rtol=1e-4, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _Scale(ftl.Hooks):
  """grads * 2 on the client; the server's mean delta * 0.5."""

  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(lambda g: 2.0 * g, grads), state

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    return jax.tree.map(lambda d: 0.5 * d, mean_delta), state


@dataclasses.dataclass(frozen=True)
class _Shift(ftl.Hooks):
  """grads + 0.01 on the client; the server's mean delta + 0.001."""

  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(lambda g: g + 0.01, grads), state

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    return jax.tree.map(lambda d: d + 0.001, mean_delta), state


@dataclasses.dataclass(frozen=True)
class _Affine(ftl.Hooks):
  """One hook doing what a chain of _Scale and _Shift documents: grads a*g + c, mean delta s*d + e."""

  a: float
  c: float
  s: float
  e: float

  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(lambda g: self.a * g + self.c, grads), state

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    return jax.tree.map(lambda d: self.s * d + self.e, mean_delta), state


def test_composed_hooks_apply_in_order(tiny_data, tiny_local, tiny_params):
  ids = np.array([0, 1, 3])

  def run(hooks):
    algo = ftl.FedAvg(tiny_local, schedule="vmap", hooks=hooks)
    return _rounds(algo, algo.init(*tiny_params), tiny_data, ids, rounds=1)[0].params

  # chain(scale, shift): grads 2g + 0.01, server 0.5 d + 0.001; chain(shift, scale): 2(g + 0.01), 0.5(d + 0.001)
  a_then_b = run(ftl.chain_hooks(_Scale(), _Shift()))
  b_then_a = run(ftl.chain_hooks(_Shift(), _Scale()))
  _close(a_then_b, run(_Affine(2.0, 0.01, 0.5, 0.001)), rtol=1e-5, atol=1e-6)
  _close(b_then_a, run(_Affine(2.0, 0.02, 0.5, 0.0005)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(a_then_b)[0], jax.tree.leaves(b_then_a)[0])


def test_composed_hooks_keep_their_states_apart(tiny_data, tiny_local, tiny_params):
  """SCAFFOLD chained with MimeLite(beta=0) (which changes no gradient) keeps SCAFFOLD's server and client
  control variates exactly as SCAFFOLD alone, whichever comes first."""
  ids = np.array([0, 1, 3])
  alone = ftl.FedAvg(tiny_local, schedule="vmap", hooks=ftl.Scaffold(lr=0.1))
  s_alone, _ = _rounds(alone, alone.init(*tiny_params, num_clients=5), tiny_data, ids)
  for hooks, i in ((ftl.chain_hooks(ftl.Scaffold(lr=0.1), ftl.MimeLite(0.0)), 0),
                   (ftl.chain_hooks(ftl.MimeLite(0.0), ftl.Scaffold(lr=0.1)), 1)):
    algo = ftl.FedAvg(tiny_local, schedule="vmap", hooks=hooks)
    s, _ = _rounds(algo, algo.init(*tiny_params, num_clients=5), tiny_data, ids)
    _close(s.params, s_alone.params, rtol=1e-6, atol=1e-7)
    _close(s.algorithm_state[i], s_alone.algorithm_state, rtol=1e-6, atol=1e-7)
    _close(s.algorithm_clients[i], s_alone.algorithm_clients, rtol=1e-6, atol=1e-7)
  assert ftl.chain_hooks(ftl.chain_hooks(_Scale(), _Shift()), _Scale()).hooks == (_Scale(), _Shift(), _Scale())
  with pytest.raises(ValueError, match="At most one"):
    ftl.chain_hooks(ftl.IFCA(2), ftl.IFCA(3))


@dataclasses.dataclass(frozen=True)
class _Watcher(ftl.Hooks):
  """Broadcasts the server's round and its params' sum (ServerView), skips every step after the first, and reports
  what it saw and how many steps counted as client metrics; its server state records the params it saw."""

  def server_init(self, params):
    return jnp.zeros((), jnp.float32)

  def broadcast_from(self, state, server):
    return jnp.stack([server.round.astype(jnp.float32), sum(jnp.sum(p) for p in jax.tree.leaves(server.params))])

  def grads(self, grads, params, state, ctx, t):
    return grads, state, t >= 1

  def finish(self, delta, params, state, ctx, steps):
    return delta, None, ctx.client_state, {"seen_round": ctx.server[0], "steps": steps.astype(jnp.float32)}

  def server_update_from(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics, server):
    return mean_delta, sum(jnp.sum(p) for p in jax.tree.leaves(server.params))


def test_hooks_see_the_server_skip_steps_and_report_metrics(tiny_data, tiny_model, tiny_params):
  params, model_state = tiny_params
  adam = LocalTraining(tiny_model, optax.adam(0.05), batch_size=4, steps=3)
  algo = ftl.FedAvg(adam, schedule="sequential/host:2", hooks=_Watcher())
  one = ftl.FedAvg(LocalTraining(tiny_model, optax.adam(0.05), batch_size=4, steps=1), schedule="sequential/host:2")
  ids = np.array([0, 1])
  s, m = _rounds(algo, algo.init(params, model_state), tiny_data, ids)
  s1, _ = _rounds(one, one.init(params, model_state), tiny_data, ids)
  _same(s.params, s1.params)  # skipped Adam steps do not move the params (a zero gradient would)
  np.testing.assert_array_equal(m["client_metrics"]["steps"], [1, 1])
  np.testing.assert_array_equal(m["client_metrics"]["seen_round"], [1, 1])
  s_before = _rounds(algo, algo.init(params, model_state), tiny_data, ids, rounds=1)[0]
  np.testing.assert_allclose(float(s.algorithm_state), sum(float(jnp.sum(p)) for p in jax.tree.leaves(s_before.params)),
                             rtol=1e-6)
