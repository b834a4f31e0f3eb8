"""Objectives beyond integer-label classification: each trains a federated model that matches a plain reference
loop (full-batch local gradient descent written here with jax.grad on the flax module, examples-weighted mean of the
clients' models), and evaluation reports the objective's metrics computed here in numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl
from fedjax_tl import objectives
from fedjax_tl.data.client_data import Dataset, FederatedData


class MLP(nn.Module):
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out)(nn.tanh(nn.Dense(8)(x)))


class TokenModel(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.vocab)(nn.Embed(self.vocab, 6)(x))  # [B, T] -> [B, T, V]


SIZES = (5, 3, 6)  # every client fits one batch of 8: each local step is full-batch gradient descent


def _federated(x, y):
  parts = np.split(np.arange(len(x)), np.cumsum(SIZES)[:-1])
  return FederatedData.from_partition(Dataset(x, y, None), parts), parts


def _reference(module, params, x, y, parts, per_example_loss, mask_fn, lr, steps, rounds):
  """Plain FedAvg: each client runs ``steps`` full-batch GD steps on its mean loss; the server averages."""
  for _ in range(rounds):
    new, ns = [], []
    for idx in parts:
      xc, yc = jnp.asarray(x[idx]), jnp.asarray(y[idx])

      def loss(p, xc=xc, yc=yc):
        per = per_example_loss(module.apply({"params": p}, xc), yc)
        m = mask_fn(yc)
        return (per * m).sum() / m.sum()

      p = params
      for _ in range(steps):
        p = jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p))
      new.append(p)
      ns.append(len(idx))
    w = np.asarray(ns, np.float64) / sum(ns)
    params = jax.tree.map(lambda *ps, w=w: sum(wi * np.asarray(pi, np.float64) for wi, pi in zip(w, ps, strict=True)),
                          *new)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return params


def _train(model, objective, data, lr=0.1, steps=3, rounds=2):
  local = ftl.LocalTraining(model, optax.sgd(lr), batch_size=8, steps=steps, objective=objective)
  algo = ftl.FedAvg(local, schedule="sequential")
  params, state = model.init(jax.random.PRNGKey(0))
  s, hist = ftl.run_rounds(algo, algo.init(params, state), data, rounds=rounds, cohort_size=3, seed=0)
  return params, s, hist


def _close(a, b, tol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def test_regression_trains_like_a_plain_loop_and_reports_mse_mae_r2():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(14, 4)).astype(np.float32)
  y = (x @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(14, 2))).astype(np.float32)
  data, parts = _federated(x, y)
  model = ftl.Model(MLP(2), (4,), sample_dtype=jnp.float32)
  params, s, hist = _train(model, objectives.regression(), data)
  want = _reference(model.module, params, x, y, parts, lambda o, t: ((o - t) ** 2).mean(-1), lambda t: jnp.ones(len(t)),
                    0.1, 3, 2)
  _close(s.params, want)
  assert set(hist[-1]) >= {"train_loss", "train_mse", "train_mae", "train_r2"}
  got = ftl.evaluate(model, s.full_params(), s.model_state, x, y, objective=objectives.regression())
  pred = np.asarray(model.module.apply({"params": want}, x))
  err = pred - y
  np.testing.assert_allclose(got["mse"], (err**2).mean(), rtol=1e-4)
  np.testing.assert_allclose(got["mae"], np.abs(err).mean(), rtol=1e-4)
  r2 = np.mean(1 - (err**2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
  np.testing.assert_allclose(got["r2"], r2, rtol=1e-3, atol=1e-4)
  assert got["loss"] == pytest.approx(got["mse"]) and got["num_examples"] == 14
  # MAE minimises absolute errors instead: a different model
  _, s_mae, _ = _train(model, objectives.regression("mae"), data)
  assert not np.allclose(jax.tree.leaves(s_mae.params)[0], jax.tree.leaves(s.params)[0])


def test_multilabel_trains_like_a_plain_loop():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(14, 4)).astype(np.float32)
  y = (x[:, :3] + 0.3 * rng.normal(size=(14, 3)) > 0).astype(np.int32)
  data, parts = _federated(x, y)
  model = ftl.Model(MLP(3), (4,), sample_dtype=jnp.float32)
  params, s, hist = _train(model, objectives.multilabel(), data)
  bce = lambda o, t: (jnp.logaddexp(0.0, o) - t * o).mean(-1)  # noqa: E731  sigmoid cross-entropy, written out
  _close(s.params, _reference(model.module, params, x, y.astype(np.float32), parts, bce, lambda t: jnp.ones(len(t)),
                              0.1, 3, 2))
  got = ftl.evaluate(model, s.full_params(), s.model_state, x, y, objective=objectives.multilabel())
  pred = np.asarray(model.module.apply({"params": s.params}, x)) > 0
  np.testing.assert_allclose(got["accuracy"], (pred == (y > 0)).mean(), rtol=1e-6)
  np.testing.assert_allclose(got["exact_match"], (pred == (y > 0)).all(1).mean(), rtol=1e-6)


def test_next_token_trains_like_a_plain_loop_and_ignores_padding():
  rng = np.random.default_rng(2)
  v, t = 5, 6
  tokens = rng.integers(0, v, (14, t + 1)).astype(np.int32)
  lengths = rng.integers(2, t + 1, 14)
  x = tokens[:, :-1].copy()
  y = tokens[:, 1:].copy()
  for i, n in enumerate(lengths):  # padding after each sequence's end
    x[i, n:], y[i, n:] = 0, -1
  data, parts = _federated(x, y)
  model = ftl.Model(TokenModel(v), (t,), preprocess=lambda a: a, sample_dtype=jnp.int32)
  params, s, hist = _train(model, objectives.next_token(), data, lr=0.5)

  def per_token_loss(o, yc):  # each sequence's mean over its real tokens, weighted below by its token count
    logp = jax.nn.log_softmax(o)
    picked = jnp.take_along_axis(logp, jnp.maximum(yc, 0)[..., None], -1)[..., 0]
    return -(picked * (yc >= 0)).sum(-1) / (yc >= 0).sum(-1)

  want = _reference(model.module, params, x, y, parts, per_token_loss, lambda yc: (yc >= 0).sum(-1), 0.5, 3, 2)
  # (sequence means weighted by token counts: the mean over the batch's real tokens)
  _close(s.params, want, tol=5e-5)
  got = ftl.evaluate(model, s.full_params(), s.model_state, x, y, objective=objectives.next_token())
  o = np.asarray(model.module.apply({"params": s.params}, x))
  real = y >= 0
  logp = o - np.log(np.exp(o).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(got["loss"], nll[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(nll[real].mean()), rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"], (o.argmax(-1) == y)[real].mean(), rtol=1e-6)


def _huber(o, t):
  return optax.huber_loss(o[:, 0], t).astype(jnp.float32)


def _abs_err(o, t):
  return jnp.abs(o[:, 0] - t)


def test_a_users_own_loss_and_metrics():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(14, 4)).astype(np.float32)
  y = (3 * x[:, 0]).astype(np.float32)
  data, parts = _federated(x, y)
  model = ftl.Model(MLP(1), (4,), sample_dtype=jnp.float32)
  objective = objectives.from_loss(_huber, {"abs_err": _abs_err})
  params, s, hist = _train(model, objective, data)
  _close(s.params, _reference(model.module, params, x, y, parts, lambda o, t: optax.huber_loss(o[:, 0], t),
                              lambda t: jnp.ones(len(t)), 0.1, 3, 2))
  assert "train_abs_err" in hist[-1]
  per = ftl.evaluate_per_client(model, s.full_params(), s.model_state, data, objective=objective)
  pred = np.asarray(model.module.apply({"params": s.params}, x))[:, 0]
  for c, idx in enumerate(parts):
    np.testing.assert_allclose(per["abs_err"][c], np.abs(pred[idx] - y[idx]).mean(), rtol=1e-5)


def test_silent_cases_now_raise():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(10, 4)).astype(np.float32)
  one_output = ftl.Model(MLP(1), (4,), sample_dtype=jnp.float32)
  params, state = one_output.init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="1 output: softmax cross-entropy over a single class is always 0"):
    ftl.evaluate(one_output, params, state, x, np.zeros(10, np.int32))
  two = ftl.Model(MLP(2), (4,), sample_dtype=jnp.float32)
  params, state = two.init(jax.random.PRNGKey(0))
  bad = x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="1 non-finite values"):
    ftl.evaluate(two, params, state, bad, np.zeros(10, np.int32))
  with pytest.raises(ValueError, match="2 value\\(s\\) per example but the model has 1 outputs"):
    ftl.evaluate(one_output, params, state, x, np.zeros((10, 2), np.float32), objective=objectives.regression())
  with pytest.raises(ValueError, match="must be 0 or 1"):
    objectives.multilabel().check(np.full((3, 2), 2), 2)
  with pytest.raises(ValueError, match="outside \\[0, 5\\) and not the padding id"):
    objectives.next_token().check(np.array([[1, 7, -1]]), 5)
  with pytest.raises(ValueError, match="num_classes=None"):
    Dataset(x, np.linspace(0, 1, 10), 3)
  # a round checks the targets against the objective before training
  data = FederatedData.from_partition(Dataset(x, rng.normal(size=(10, 3)).astype(np.float32), None),
                                      [np.arange(5), np.arange(5, 10)])
  algo = ftl.FedAvg(ftl.LocalTraining(two, optax.sgd(0.1), 4, objective=objectives.regression()))
  with pytest.raises(ValueError, match="3 value\\(s\\) per example but the model has 2 outputs"):
    algo.apply(algo.init(params, state), data, np.array([0, 1]), jax.random.PRNGKey(0))


def _per_class_correct(outputs, targets):
  return jax.nn.one_hot(targets, 3) * (jnp.argmax(outputs, -1) == targets)[:, None]


def _per_class_count(outputs, targets):
  return jax.nn.one_hot(targets, 3)


def test_user_metrics_beside_the_objectives_own():
  """Classification with balanced accuracy's parts (per-class correct and count indicators): the same loss and
  accuracy as plain classification (bit for bit), and per-client per-class rates computed in numpy."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(14, 4)).astype(np.float32)
  y = rng.integers(0, 3, 14).astype(np.int32)
  parts = np.split(np.arange(14), np.cumsum(SIZES)[:-1])
  data = FederatedData.from_partition(Dataset(x, y, 3), parts)
  model = ftl.Model(MLP(3), (4,), sample_dtype=jnp.float32)
  obj = objectives.with_metrics(objectives.classification(), {"correct_k": _per_class_correct,
                                                             "share_k": _per_class_count})
  _, s, hist = _train(model, obj, data)
  _, s_plain, hist_plain = _train(model, objectives.classification(), data)
  for u, v in zip(jax.tree.leaves(s.params), jax.tree.leaves(s_plain.params), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert hist[-1]["train_loss"] == hist_plain[-1]["train_loss"]
  per = ftl.evaluate_per_client(model, s.full_params(), s.model_state, data, objective=obj)
  pred = np.asarray(model.module.apply({"params": s.params}, x)).argmax(-1)
  for c, idx in enumerate(parts):
    onehot = np.eye(3)[y[idx]]
    np.testing.assert_allclose(per["correct_k"][c], (onehot * (pred[idx] == y[idx])[:, None]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(per["share_k"][c], onehot.mean(0), rtol=1e-6)
  g = ftl.evaluate(model, s.full_params(), s.model_state, x, y, objective=obj)
  balanced = np.mean(np.asarray(g["correct_k"]) / np.asarray(g["share_k"]))
  want = np.mean([(pred[y == k] == k).mean() for k in range(3)])
  np.testing.assert_allclose(balanced, want, rtol=1e-6)
  with pytest.raises(ValueError, match="own metric names"):
    objectives.with_metrics(objectives.classification(), {"accuracy": _per_class_count})
