import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg, sample_clients
from fedjax_tl.core.params import split_params, tree_bytes
from fedjax_tl.core.train import run_rounds
from fedjax_tl.models.base import Model


def _close(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, **kw)


def test_one_client_makes_aggregation_the_identity(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  key = jax.random.PRNGKey(0)
  algo = FedAvg(tiny_local, schedule="sequential")
  s, _ = algo.apply(algo.init(params, state), tiny_data, np.array([1]), key)
  # The client's own result: run it as a one-client round with the server learning rate 0 to read the delta.
  runner = algo.runner(tiny_data.pad_size)
  sums = runner(params, {}, state, tiny_data.x, tiny_data.y, tiny_data.cohort([1]), key)
  client = jax.tree.map(lambda p, d: p + d / sums.weight_sum, params, sums.delta_sum)
  _close(s.params, client, rtol=1e-6, atol=1e-7)
  assert float(sums.weight_sum) == 12.0


def test_server_optimizer_acts_on_pseudo_gradient(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  key = jax.random.PRNGKey(1)
  ids = np.array([0, 3])
  plain = FedAvg(tiny_local, schedule="vmap")
  s1, _ = plain.apply(plain.init(params, state), tiny_data, ids, key)
  half = FedAvg(tiny_local, server_optimizer=optax.sgd(0.5), schedule="vmap")
  s2, _ = half.apply(half.init(params, state), tiny_data, ids, key)
  # server lr 0.5 moves exactly half as far as plain FedAvg (lr 1)
  _close(jax.tree.map(lambda a, b: a - b, s2.params, params),
         jax.tree.map(lambda a, b: 0.5 * (a - b), s1.params, params), rtol=1e-5, atol=1e-7)
  assert int(s2.round) == 1


def test_frozen_params_are_neither_trained_nor_sent(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  algo = FedAvg(tiny_local, schedule="sequential/host:2", trainable="^head/")
  s0 = algo.init(params, state)
  assert set(s0.params) == {"head"} and "conv0" in s0.frozen
  s, m = algo.apply(s0, tiny_data, np.array([0, 1]), jax.random.PRNGKey(0))
  _close(s.frozen, s0.frozen, rtol=0, atol=0)
  assert not np.allclose(s.params["head"]["kernel"], s0.params["head"]["kernel"])
  assert int(m["bytes_up"]) == 2 * tree_bytes(params["head"]) < 2 * tree_bytes(params)
  assert set(s.full_params()) == set(params)
  with pytest.raises(ValueError, match="matches no parameter"):
    split_params(params, "^backbone/")


class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = x.reshape(x.shape[0], -1)
    m = None if mask is None else mask[:, None]  # flax wants the mask broadcastable to x
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x, mask=m)
    return nn.Dense(3)(x)


@pytest.fixture
def bn_model():
  model = Model(_BNNet(), (8, 8, 1))
  return (model, *model.init(jax.random.PRNGKey(0)))


@pytest.mark.parametrize("mode", ["average", "frozen"])
def test_batch_stats_average_or_frozen(mode, tiny_data, bn_model):
  model, params, state = bn_model
  local = LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=1)
  key = jax.random.PRNGKey(2)
  algo = FedAvg(local, schedule="vmap", model_state=mode)
  s, _ = algo.apply(algo.init(params, state), tiny_data, np.array([0, 3]), key)
  if mode == "frozen":
    _close(s.model_state, state, rtol=0, atol=0)
    return
  singles = []
  for c in (0, 3):
    one = FedAvg(local, schedule="vmap", model_state=mode)
    sc, _ = one.apply(one.init(params, state), tiny_data, np.array([c]), key)
    singles.append(sc.model_state)
  w = np.array([7.0, 9.0]) / 16
  _close(s.model_state, jax.tree.map(lambda a, b: w[0] * a + w[1] * b, *singles), rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_ignore_padding_rows(tiny_data, bn_model):
  """A 7-example client at batch 4 has a partial batch; its BN statistics must not see the padded rows."""
  model, params, state = bn_model
  idx = tiny_data.client_indices[0][:3]
  xb = tiny_data.x[np.concatenate([idx, [0]])]
  mask = jnp.array([True, True, True, False])
  _, masked = model.apply(params, state, xb, train=True, mask=mask)
  _, real = model.apply(params, state, tiny_data.x[idx], train=True)
  _close(masked, real, rtol=1e-5, atol=1e-6)


def test_sample_clients():
  a = sample_clients(jax.random.PRNGKey(0), 100, 10)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  np.testing.assert_array_equal(a, sample_clients(jax.random.PRNGKey(0), 100, 10))
  assert not np.array_equal(a, sample_clients(jax.random.PRNGKey(1), 100, 10))
  np.testing.assert_array_equal(sample_clients(jax.random.PRNGKey(0), 5, 5), np.arange(5))
  with pytest.raises(ValueError, match="cohort_size"):
    sample_clients(jax.random.PRNGKey(0), 5, 6)


def test_evaluate_matches_direct_computation(tiny_model, tiny_params, tiny_data):
  params, state = tiny_params
  x, y = np.asarray(tiny_data.x), np.asarray(tiny_data.y)
  logits, _ = tiny_model.apply(params, state, x, train=False)
  expected_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
  expected_acc = float((np.argmax(logits, -1) == y).mean())
  out = evaluate(tiny_model, params, state, x, y, batch_size=16)  # 40 = 16 + 16 + 8 (padded, masked)
  assert out["num_examples"] == 40
  np.testing.assert_allclose(out["loss"], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(out["accuracy"], expected_acc)


def test_run_rounds_records_and_nan_loss_error(tiny_model, tiny_data, tiny_params):
  params, state = tiny_params
  algo = FedAvg(LocalTraining(tiny_model, optax.sgd(0.1), 4), schedule="vmap")
  s, hist = run_rounds(algo, algo.init(params, state), tiny_data, rounds=3, cohort_size=2, seed=0,
                       evaluate_fn=lambda s: {"accuracy": 0.5}, eval_every=2)
  assert [h["round"] for h in hist] == [1, 2, 3] and int(s.round) == 3
  assert "test_accuracy" in hist[1] and "test_accuracy" in hist[2] and "test_accuracy" not in hist[0]
  bad = FedAvg(LocalTraining(tiny_model, optax.sgd(float("nan")), 4), schedule="vmap")
  with pytest.raises(FloatingPointError, match="round 1"):
    run_rounds(bad, bad.init(params, state), tiny_data, rounds=2, cohort_size=2, seed=0)


def test_frozen_statistics_train_in_inference_mode(tiny_data, bn_model):
  """With model_state="frozen" the client's training loss is the eval-mode loss (running statistics)."""
  model, params, state = bn_model
  state = jax.tree.map(lambda a: a + 0.3, state)  # running stats far from any batch's statistics
  idx = tiny_data.client_indices[2]  # 3 examples: one batch of 4 holds them all
  x, y = np.asarray(tiny_data.x)[idx], np.asarray(tiny_data.y)[idx]
  eval_loss = evaluate(model, params, state, x, y)["loss"]
  results = {}
  for mode in ("frozen", "average"):
    algo = FedAvg(LocalTraining(model, optax.sgd(0.0), batch_size=4, steps=1), schedule="vmap", model_state=mode)
    s, m = algo.apply(algo.init(params, state), tiny_data, np.array([2]), jax.random.PRNGKey(0))
    results[mode] = float(m["train_loss"])
    if mode == "frozen":
      _close(s.model_state, state, rtol=0, atol=0)
  np.testing.assert_allclose(results["frozen"], eval_loss, rtol=1e-5)
  assert abs(results["average"] - eval_loss) > 1e-3  # batch statistics differ: the test can fail


@pytest.mark.parametrize("spec", ["vmap", "chunked:2/host:2"])
def test_local_statistics_persist_per_client(spec, tiny_data, bn_model):
  model, params, state = bn_model
  local = LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=1)
  key = jax.random.PRNGKey(5)
  algo = FedAvg(local, schedule=spec, model_state="local")
  with pytest.raises(ValueError, match="num_clients"):
    algo.init(params, state)
  s0 = algo.init(params, state, num_clients=tiny_data.num_clients)
  s1, m = algo.apply(s0, tiny_data, np.array([0, 3, 4]), key)
  assert m["bytes_up"] == 3 * tree_bytes(params)  # statistics are not sent
  # The cohort's rows hold each client's own final statistics (= a one-client "average" round) ...
  for c in (0, 3):
    one = FedAvg(local, schedule="vmap", model_state="average")
    sc, _ = one.apply(one.init(params, state), tiny_data, np.array([c]), key)
    _close(jax.tree.map(lambda a, c=c: a[c], s1.client_states), sc.model_state, rtol=1e-5, atol=1e-6)
  # ... and the others are untouched.
  for c in (1, 2):
    _close(jax.tree.map(lambda a, c=c: a[c], s1.client_states), state, rtol=0, atol=0)
  # Round 2: client 0 starts from its own statistics, not the server's.
  s2, _ = algo.apply(s1, tiny_data, np.array([0]), key)
  restart = FedAvg(local, schedule="vmap", model_state="local")
  r0 = restart.init(s1.full_params(), state, num_clients=tiny_data.num_clients)
  r2, _ = restart.apply(r0, tiny_data, np.array([0]), key)
  assert not np.allclose(jax.tree.leaves(s2.client_states)[0][0], jax.tree.leaves(r2.client_states)[0][0])
