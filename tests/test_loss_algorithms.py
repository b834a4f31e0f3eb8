"""Algorithms built on the loss hook (MOON, FedLC, q-FFL), each against a plain per-client loop written here:
full-batch local gradient descent (every client fits one batch) with jax.grad on the flax module's own apply, the
algorithm's formulas in jnp/numpy; and against FedAvg bit for bit where the algorithm reduces to it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl
from fedjax_tl.data.client_data import Dataset, FederatedData

SIZES, LR, STEPS = (6, 4, 7), 0.3, 3


class FeatMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(x))
    return {"logits": nn.Dense(3)(h), "features": h}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = np.concatenate([rng.choice(3, s, p=p) for s, p in zip(SIZES, ([.8, .1, .1], [.1, .1, .8], [.3, .4, .3]),
                                                             strict=True)]).astype(np.int32)
  parts = np.split(np.arange(n), np.cumsum(SIZES)[:-1])
  data = FederatedData.from_partition(Dataset(x, y, 3), parts)
  model = ftl.Model(FeatMLP(), (6,), sample_dtype=jnp.float32)
  params, state = model.init(jax.random.PRNGKey(1))
  return x, y, parts, data, model, params, state


def _ce(logits, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0].mean()


def _gd(loss, p):
  for _ in range(STEPS):
    p = jax.tree.map(lambda a, g: a - LR * g, p, jax.grad(loss)(p))
  return p


def _wmean(trees, weights):
  w = np.asarray(weights, np.float64) / np.sum(weights)
  return jax.tree.map(lambda *ts: sum(wi * np.asarray(t, np.float64) for wi, t in zip(w, ts, strict=True)), *trees)


def _run(setup, hooks, rounds, num_clients=None, schedule="sequential/host:2"):
  x, y, parts, data, model, params, state = setup
  algo = ftl.FedAvg(ftl.LocalTraining(model, optax.sgd(LR), batch_size=8, steps=STEPS), schedule=schedule,
                    hooks=hooks)
  s = algo.init(params, state, num_clients=num_clients)
  for r in range(rounds):
    s, _ = algo.apply(s, data, np.arange(3), jax.random.PRNGKey(r))
  return s


def _close(a, b, tol=3e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def _same(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_moon_against_a_plain_loop(setup):
  x, y, parts, data, model, params, _ = setup
  mu, tau = 2.0, 0.5
  s = _run(setup, ftl.MOON(mu=mu, temperature=tau), rounds=2, num_clients=3)
  apply = lambda p, xc: model.module.apply({"params": p}, xc)  # noqa: E731
  cos = lambda a, b: (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))  # noqa: E731
  w, prev = params, [params] * 3
  for _ in range(2):
    new = []
    for k, idx in enumerate(parts):
      xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])
      zg, zp = apply(w, xc)["features"], apply(prev[k], xc)["features"]

      def loss(p, xc=xc, yc=yc, zg=zg, zp=zp):
        out = apply(p, xc)
        pos, neg = cos(out["features"], zg) / tau, cos(out["features"], zp) / tau
        return _ce(out["logits"], yc) + mu * (-jnp.log(jnp.exp(pos) / (jnp.exp(pos) + jnp.exp(neg)))).mean()

      new.append(_gd(loss, w))
    prev = new
    w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _wmean(new, SIZES))
  _close(s.params, w)
  for k in range(3):
    _close(jax.tree.map(lambda a, k=k: a[k], s.algorithm_clients), prev[k])


def test_fedlc_against_a_plain_loop(setup):
  x, y, parts, data, model, params, _ = setup
  tau = 0.7
  hooks = ftl.FedLC.for_data(data, tau)
  assert hooks.label_counts == tuple(tuple(np.bincount(y[idx], minlength=3).tolist()) for idx in parts)
  s = _run(setup, hooks, rounds=1)
  new = []
  for idx in parts:
    xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])
    shift = tau * np.maximum(np.bincount(y[idx], minlength=3), 1e-8) ** -0.25

    def loss(p, xc=xc, yc=yc, shift=shift):
      return _ce(model.module.apply({"params": p}, xc)["logits"] - shift, yc)

    new.append(_gd(loss, params))
  _close(s.params, _wmean(new, SIZES))


def test_qffl_against_a_plain_loop(setup):
  x, y, parts, data, model, params, _ = setup
  q = 2.0
  s = _run(setup, ftl.QFFL(q=q, lr=LR), rounds=2)
  big_l, w = 1.0 / LR, params
  for _ in range(2):
    nums, hs = [], []
    for idx in parts:
      xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])
      loss = lambda p, xc=xc, yc=yc: _ce(model.module.apply({"params": p}, xc)["logits"], yc)  # noqa: E731
      f = float(loss(w))
      dw = jax.tree.map(lambda a, b: big_l * (np.asarray(a, np.float64) - np.asarray(b)), w, _gd(loss, w))
      norm2 = sum(float((d**2).sum()) for d in jax.tree.leaves(dw))
      nums.append(jax.tree.map(lambda d, f=f: f**q * d, dw))
      hs.append(q * f ** (q - 1) * norm2 + big_l * f**q)
    w = jax.tree.map(lambda a, *n, hs=hs: jnp.asarray(np.asarray(a) - sum(n) / sum(hs), jnp.float32), w, *nums)
  _close(s.params, w, tol=1e-4)


def test_loss_algorithms_reduce_to_fedavg_bit_for_bit(setup):
  plain = _run(setup, None, rounds=2)
  _same(_run(setup, ftl.MOON(mu=0.0), rounds=2, num_clients=3).params, plain.params)
  _same(_run(setup, ftl.FedLC.for_data(setup[3], tau=0.0), rounds=2).params, plain.params)
  with pytest.raises(ValueError, match="representation"):
    x, y, parts, data, model, params, state = setup
    plain_model = ftl.Model(nn.Dense(3), (6,), sample_dtype=jnp.float32)
    p, st = plain_model.init(jax.random.PRNGKey(0))
    algo = ftl.FedAvg(ftl.LocalTraining(plain_model, optax.sgd(LR), batch_size=8, steps=1), hooks=ftl.MOON())
    algo.apply(algo.init(p, st, num_clients=3), data, np.arange(3), jax.random.PRNGKey(0))


def test_apfl_against_a_plain_loop(setup):
  """Each step: w by the objective's gradient (FedAvg), v by the gradient of the mixture's loss at the same w;
  the server averages w; each client keeps v (and its adapted alpha)."""
  from fedjax_tl.algorithms import apfl

  x, y, parts, data, model, params, _ = setup

  def apply(p, xc):
    return model.module.apply({"params": p}, xc)["logits"]

  for adapt in (False, True):
    s = _run(setup, ftl.APFL(alpha=0.4, lr=LR, adapt_alpha=adapt), rounds=2, num_clients=3)
    w, vs, alphas = params, [params] * 3, [0.4] * 3
    for _ in range(2):
      new = []
      for k, idx in enumerate(parts):
        xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])
        wk, v, a = w, vs[k], jnp.float32(alphas[k])
        for _ in range(STEPS):
          mixed = lambda v, a, wk=wk, xc=xc, yc=yc: _ce(apply(jax.tree.map(  # noqa: E731
              lambda p, q: a * p + (1 - a) * q, v, wk), xc), yc)
          gv, ga = jax.grad(mixed, argnums=(0, 1))(v, a)
          gw = jax.grad(lambda p, xc=xc, yc=yc: _ce(apply(p, xc), yc))(wk)
          v = jax.tree.map(lambda p, g: p - LR * g, v, gv)
          if adapt:
            a = jnp.clip(a - LR * ga, 0.0, 1.0)
          wk = jax.tree.map(lambda p, g: p - LR * g, wk, gw)
        new.append(wk)
        vs[k], alphas[k] = v, float(a)
      w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _wmean(new, SIZES))
    _close(s.params, w)
    _close(s.algorithm_clients["v"], jax.tree.map(lambda *v: np.stack(v), *vs))
    np.testing.assert_allclose(np.asarray(s.algorithm_clients["alpha"]), alphas, rtol=1e-5, atol=1e-6)
    mix = apfl.personal_models(s)
    a0 = alphas[0]
    _close(jax.tree.map(lambda a: a[0], mix), jax.tree.map(lambda v, ww, a0=a0: a0 * v + (1 - a0) * ww, vs[0], w))
  _same(_run(setup, ftl.APFL(alpha=0.0), rounds=2, num_clients=3).params, _run(setup, None, rounds=2).params)


def test_fedlc_leaves_clients_outside_its_table_uncalibrated(setup):
  """A client id beyond FedLC's label counts (a privacy audit's canary appended to the population) trains on the
  plain cross-entropy: equal counts shift every logit alike."""
  x, y, parts, data, model, params, _ = setup
  tau = 0.7
  full = ftl.FedLC.for_data(data, tau)
  s = _run(setup, ftl.FedLC(tau, full.label_counts[:2]), rounds=1)
  new = []
  for k, idx in enumerate(parts):
    xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])
    shift = tau * np.maximum(np.bincount(y[idx], minlength=3), 1e-8) ** -0.25 if k < 2 else 0.0

    def loss(p, xc=xc, yc=yc, shift=shift):
      return _ce(model.module.apply({"params": p}, xc)["logits"] - shift, yc)

    new.append(_gd(loss, params))
  _close(s.params, _wmean(new, SIZES))
