"""Personalized evaluation (public API only): per-client held-out splits and ``evaluate_per_client`` (optionally
after k fine-tuning steps), against plain Python loops over clients that evaluate each one with
``fedjax_tl.evaluate`` and fine-tune it with plain optax steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl


def _client_xy(fd, c):
  idx = np.asarray(fd.client_indices[c])
  return np.asarray(fd.x)[idx], np.asarray(fd.y)[idx]


def _reference(model, params_of, model_state, test):
  """(accuracy, loss, n) per client from ``fedjax_tl.evaluate`` on each client alone (NaN for no examples)."""
  acc, loss, n = [], [], []
  for c in range(test.num_clients):
    x, y = _client_xy(test, c)
    if not len(y):
      acc.append(np.nan), loss.append(np.nan), n.append(0)
      continue
    out = fedjax_tl.evaluate(model, params_of(c), model_state, x, y)
    acc.append(out["accuracy"]), loss.append(out["loss"]), n.append(out["num_examples"])
  return np.array(acc), np.array(loss), np.array(n)


def _close_nan(a, b, **kw):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True, **kw)


def test_split_clients_is_disjoint_covering_and_deterministic(tiny_data):
  train, test = tiny_data.split_clients(test_fraction=0.3, seed=0)
  assert train.num_clients == test.num_clients == tiny_data.num_clients
  for c, idx in enumerate(tiny_data.client_indices):
    tr, te = set(train.client_indices[c].tolist()), set(test.client_indices[c].tolist())
    assert not tr & te and tr | te == set(np.asarray(idx).tolist())
    if len(idx) >= 2:
      assert tr and te
  assert list(test.client_sizes) == [2, 4, 1, 3, 0]  # round(0.3 n) clipped to [1, n - 1]; the 1-example client
  again, other = tiny_data.split_clients(0.3, seed=0), tiny_data.split_clients(0.3, seed=1)
  for c in range(tiny_data.num_clients):
    np.testing.assert_array_equal(again[1].client_indices[c], test.client_indices[c])
  assert any(set(other[1].client_indices[c].tolist()) != set(test.client_indices[c].tolist()) for c in range(4))
  with pytest.raises(ValueError, match="test_fraction"):
    tiny_data.split_clients(1.0)


def test_per_client_accuracy_matches_a_loop_and_numpy_summaries(tiny_model, tiny_data, tiny_params):
  params, model_state = tiny_params
  train, test = tiny_data.split_clients(0.5, seed=0)
  # Global params.
  out = fedjax_tl.evaluate_per_client(tiny_model, params, model_state, test)
  acc, loss, n = _reference(tiny_model, lambda c: params, model_state, test)
  _close_nan(out["accuracy"], acc, rtol=1e-6)
  _close_nan(out["loss"], loss, rtol=1e-5)
  np.testing.assert_array_equal(out["num_examples"], n)
  # Stacked per-client params (each client its own perturbed model), evaluated two clients at a time.
  noise = [jax.tree.map(lambda a, c=c: a + 0.3 * jax.random.normal(jax.random.PRNGKey(c), a.shape), params)
           for c in range(test.num_clients)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *noise)
  out = fedjax_tl.evaluate_per_client(tiny_model, stacked, model_state, test, chunk_size=2)
  acc, loss, n = _reference(tiny_model, lambda c: noise[c], model_state, test)
  _close_nan(out["accuracy"], acc, rtol=1e-6)
  _close_nan(out["loss"], loss, rtol=1e-5)
  # Summaries: numpy over the clients with test examples.
  ok = n > 0
  for name, v in (("accuracy", acc), ("loss", loss)):
    s = out["summary"][name]
    np.testing.assert_allclose(s["weighted_mean"], np.average(v[ok], weights=n[ok]), rtol=1e-6)
    np.testing.assert_allclose(s["mean"], np.mean(v[ok]), rtol=1e-6)
    np.testing.assert_allclose(s["p10"], np.percentile(v[ok], 10), rtol=1e-6)
  assert out["summary"]["num_clients"] == int(ok.sum())
  # The weighted mean accuracy is the pooled accuracy over all test examples.
  pooled = np.sum(acc[ok] * n[ok]) / n[ok].sum()
  np.testing.assert_allclose(out["summary"]["accuracy"]["weighted_mean"], pooled, rtol=1e-6)


@pytest.mark.parametrize("trainable", [None, "^head/"])
def test_finetune_matches_plain_optax_steps_per_client(tiny_model, tiny_data, tiny_params, trainable):
  """k full-batch steps (batch size >= every client's training set) of sgd with momentum, per client in a
  Python loop, then ``fedjax_tl.evaluate``."""
  params, model_state = tiny_params
  train, test = tiny_data.split_clients(0.3, seed=0)
  k, opt = 3, optax.sgd(0.5, momentum=0.9)
  local = fedjax_tl.LocalTraining(tiny_model, opt, batch_size=16, epochs=1)
  out = fedjax_tl.evaluate_per_client(tiny_model, params, model_state, test, finetune=k, local=local, train=train,
                                      trainable=trainable, key=jax.random.PRNGKey(7))

  def tuned(c):
    x, y = _client_xy(train, c)
    if trainable is None:
      p, frozen = params, {}
    else:
      p, frozen = {"head": params["head"]}, {k_: v for k_, v in params.items() if k_ != "head"}

    def loss_fn(p_):
      logits, _ = tiny_model.apply({**frozen, **p_}, model_state, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    s = opt.init(p)
    for _ in range(k):
      g = jax.grad(loss_fn)(p)
      u, s = opt.update(g, s, p)
      p = optax.apply_updates(p, u)
    return {**frozen, **p}

  acc, loss, n = _reference(tiny_model, tuned, model_state, test)
  _close_nan(out["accuracy"], acc, atol=1e-5)
  _close_nan(out["loss"], loss, atol=1e-5)
  np.testing.assert_array_equal(out["num_examples"], n)
  plain = fedjax_tl.evaluate_per_client(tiny_model, params, model_state, test)
  assert not np.allclose(plain["loss"][:4], out["loss"][:4])  # fine-tuning changed something


def test_one_compile_for_clients_of_different_sizes(tiny_data, tiny_params):
  """Clients of sizes 7, 12, 3, 9, 1 (test 2, 4, 1, 3, 0): one trace of the evaluation step and one of the
  fine-tuning step for the whole population; new params of the same shapes trace nothing."""
  traces = []

  def counting_preprocess(x):
    traces.append(x.shape[0])
    return x.astype(jnp.float32) / 255.0

  model = fedjax_tl.Model(fedjax_tl.CNN(num_classes=3, features=(4,), hidden=8), (8, 8, 1),
                          preprocess=counting_preprocess)
  params, model_state = tiny_params
  train, test = tiny_data.split_clients(0.3, seed=0)
  local = fedjax_tl.LocalTraining(model, optax.sgd(0.1), batch_size=16)
  model.num_outputs()  # the label check's abstract trace (batch 1), cached per model
  traces.clear()
  fedjax_tl.evaluate_per_client(model, params, model_state, test)
  assert traces.count(8) == 1  # test pad size 4 -> one 8-row evaluation batch, traced once for all 5 clients
  traces.clear()
  fedjax_tl.evaluate_per_client(model, params, model_state, test, finetune=2, local=local, train=train)
  assert sorted(traces) == [8, 16]  # one fine-tuning step (batch 16) and one evaluation batch, for all clients
  traces.clear()
  other = jax.tree.map(lambda a: a + 1.0, params)
  fedjax_tl.evaluate_per_client(model, other, model_state, test, finetune=2, local=local, train=train)
  assert traces == []


def test_fedper_clients_are_evaluated_with_their_own_heads(tiny_local, tiny_data, tiny_params):
  params, model_state = tiny_params
  train, test = tiny_data.split_clients(0.5, seed=0)
  fedper = fedjax_tl.FedAvg(tiny_local, schedule="vmap", local_params="^head/")
  state = fedper.init(params, model_state, num_clients=train.num_clients)
  state, _ = fedper.apply(state, train, np.array([0, 1, 3]), jax.random.PRNGKey(0))
  stacked = state.all_client_params()
  model = tiny_local.model
  out = fedjax_tl.evaluate_per_client(model, stacked, model_state, test)
  acc, loss, _ = _reference(model, state.client_full_params, model_state, test)
  _close_nan(out["accuracy"], acc, rtol=1e-6)
  _close_nan(out["loss"], loss, rtol=1e-5)


def test_finetune_is_the_clients_own_local_training(tiny_model, tiny_data, tiny_params):
  """Minibatch fine-tuning (batch 2, reshuffled epochs) of client c with key K is the local training client c
  does in a FedAvg round with round key K (a one-client round with server sgd(1.0) returns the client's model),
  also when the clients are evaluated two at a time."""
  params, model_state = tiny_params
  train, test = tiny_data.split_clients(0.3, seed=0)
  key, k = jax.random.PRNGKey(3), 4
  local = fedjax_tl.LocalTraining(tiny_model, optax.sgd(0.1), batch_size=2, steps=k)
  out = fedjax_tl.evaluate_per_client(tiny_model, params, model_state, test, finetune=k, local=local, train=train,
                                      key=key, chunk_size=2)
  plain = fedjax_tl.FedAvg(local, schedule="vmap")
  tuned = {c: plain.apply(plain.init(params, model_state), train, np.array([c]), key)[0].full_params()
           for c in range(4)}  # client 4 has no test examples
  acc, loss, _ = _reference(tiny_model, lambda c: tuned.get(c, params), model_state, test)
  _close_nan(out["accuracy"], acc, atol=1e-5)
  _close_nan(out["loss"], loss, atol=1e-5)


class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = x.reshape(x.shape[0], -1)
    x = nn.BatchNorm(use_running_average=not train)(x, mask=None if mask is None else mask[:, None])
    return nn.Dense(3, name="head")(x)


def test_per_client_model_state(tiny_data):
  """A stacked model state (FedBN's own statistics per client, ``model_state="local"``) gives each client its
  own; the same as evaluating each client with its statistics."""
  model = fedjax_tl.Model(_BNNet(), (8, 8, 1))
  params, model_state = model.init(jax.random.PRNGKey(0))
  train, test = tiny_data.split_clients(0.5, seed=0)
  states = [jax.tree.map(lambda a, c=c: a + 0.2 * c, model_state) for c in range(test.num_clients)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  out = fedjax_tl.evaluate_per_client(model, params, stacked, test)
  want = []
  for c in range(test.num_clients):
    x, y = _client_xy(test, c)
    want.append(fedjax_tl.evaluate(model, params, states[c], x, y)["loss"] if len(y) else np.nan)
  _close_nan(out["loss"], want, rtol=1e-5)
  assert len(set(np.round(out["loss"][:4], 6))) == 4
