"""Compression transforms: limiting cases, unbiasedness, error feedback, exact sizes, FedAvg integration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.transforms import chain, clip_l2, compression
from fedjax_tl.transforms.base import encoded_bits


def _tree(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": jax.random.normal(k1, (37, 19)), "b": 0.01 * jax.random.normal(k2, (19,))}


def _apply(t, tree, key=0, state=None):
  return t.apply(tree, t.init(tree) if state is None else state, jax.random.PRNGKey(key))


def _rel_err(a, b):
  fa = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
  fb = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
  return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def test_many_levels_nearly_lossless_and_few_levels_not():
  u = _tree()
  assert _rel_err(_apply(compression.qsgd(16), u)[0], u) < 1e-3
  assert _rel_err(_apply(compression.qsgd(2), u)[0], u) > 0.3
  assert _rel_err(_apply(compression.int8(), u)[0], u) < 0.02


def test_keeping_everything_is_the_identity():
  u = _tree()
  for t in (compression.top_k(1.0), compression.random_k(1.0), compression.random_k(1.0, rescale=True)):
    out, _ = _apply(t, u)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(u)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [lambda: compression.qsgd(2, bucket_size=8),
                                  lambda: compression.random_k(0.25, rescale=True)])
def test_stochastic_compressors_are_unbiased(make):
  t = make()
  u = {"v": jnp.array([0.3, -1.2, 0.05, 2.0, 0.0, -0.7, 0.9, 0.11])}
  draws = jax.vmap(lambda k: t.apply(u, t.init(u), k)[0]["v"])(jax.random.split(jax.random.PRNGKey(1), 20000))
  mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
  assert float(jnp.max(jnp.abs(mean - u["v"]) / jnp.maximum(se, 1e-6))) < 5.0  # within 5 standard errors
  assert float(jnp.max(se)) > 1e-3  # and the draws really are random


def test_top_k_keeps_the_largest_and_sign_scales():
  u = _tree()
  out, _ = _apply(compression.top_k(0.1), u)
  flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(u)])
  kept = jnp.concatenate([x.ravel() for x in jax.tree.leaves(out)])
  k = round(0.1 * flat.size)
  assert int((kept != 0).sum()) == k
  assert float(jnp.abs(flat)[kept == 0].max()) <= float(jnp.abs(flat)[kept != 0].min())
  s, _ = _apply(compression.scaled_sign(), u)
  np.testing.assert_allclose(jnp.abs(s["w"]), jnp.mean(jnp.abs(u["w"])), rtol=1e-6)
  assert bool(jnp.all(jnp.sign(s["w"]) == jnp.where(u["w"] >= 0, 1, -1)))


@pytest.mark.parametrize("make", [lambda: compression.top_k(0.05), lambda: compression.scaled_sign(),
                                  lambda: compression.random_k(0.05)])
def test_error_feedback_running_sum_is_within_the_residual(make):
  t = compression.error_feedback(make())
  state = t.init(_tree())
  true_sum = sent_sum = jax.tree.map(jnp.zeros_like, _tree())
  for r in range(30):
    u = _tree(r)
    sent, state = t.apply(u, state, jax.random.PRNGKey(100 + r))
    true_sum = jax.tree.map(jnp.add, true_sum, u)
    sent_sum = jax.tree.map(jnp.add, sent_sum, sent)
  for s, u, e in zip(jax.tree.leaves(sent_sum), jax.tree.leaves(true_sum), jax.tree.leaves(state)):
    np.testing.assert_allclose(s + e, u, atol=1e-4)  # sum(sent) = sum(true) - residual
  # without feedback the gap is the whole dropped mass, with it only the last residual
  no_ef = jax.tree.map(jnp.zeros_like, _tree())
  for r in range(30):
    no_ef = jax.tree.map(jnp.add, no_ef, _apply(make(), _tree(r), 100 + r)[0])
  assert _rel_err(sent_sum, true_sum) < _rel_err(no_ef, true_sum)


def test_encoded_sizes_are_exact():
  u = _tree()  # 703 + 19 = 722 coordinates in two leaves
  d = 722
  assert encoded_bits(None, u) == 32 * d
  assert encoded_bits(compression.int8(), u) == 8 * d + 2 * 32
  assert encoded_bits(compression.qsgd(4, bucket_size=512), u) == 4 * d + 32 * (2 + 1)
  assert encoded_bits(compression.top_k(0.01), u) == 7 * (32 + 10)  # k = round(7.22), ceil(log2 722) = 10
  assert encoded_bits(compression.random_k(0.01), u) == 7 * 32 + 64
  assert encoded_bits(compression.error_feedback(compression.scaled_sign()), u) == d + 2 * 32
  assert encoded_bits(chain(clip_l2(1.0), compression.int8()), u) == 8 * d + 64
  with pytest.raises(ValueError, match="compressors"):
    chain(compression.int8(), compression.top_k(0.1))


def test_parse():
  assert compression.parse("none") is None
  assert compression.parse("topk:0.01").init(_tree())  # error feedback by default: has a residual
  assert not jax.tree.leaves(compression.parse("topk:0.01/noef").init(_tree()))
  assert not jax.tree.leaves(compression.parse("randk:0.1/unbiased").init(_tree()))
  assert encoded_bits(compression.parse("qsgd:3"), _tree()) == encoded_bits(compression.qsgd(3), _tree())
  for bad in ("topk", "qsgd:1", "zip", "topk:2", "int8/unbiased"):
    with pytest.raises(ValueError, match="compression"):
      compression.parse(bad)


def _round(algo, state, data, ids, key=5):
  s, m = algo.apply(state, data, np.asarray(ids), jax.random.PRNGKey(key))
  return m, s


@pytest.mark.parametrize("schedule", ["vmap", "sequential/host:2"])
def test_error_feedback_state_persists_per_client_in_fedavg(schedule, tiny_data, tiny_local, tiny_params):
  t = compression.error_feedback(compression.top_k(0.1))
  algo = FedAvg(tiny_local, client_transform=t, schedule=schedule)
  state = algo.init(*tiny_params, num_clients=tiny_data.num_clients)
  m1, s1 = _round(algo, state, tiny_data, [0, 2, 4])
  plain = FedAvg(tiny_local, schedule=schedule)
  p0 = plain.init(*tiny_params)
  for c in range(tiny_data.num_clients):
    res = jax.tree.map(lambda a, c=c: a[c], s1.transform_states)
    if c in (0, 2, 4):  # the residual is exactly what top-k left out of this client's delta
      _, solo = _round(plain, p0, tiny_data, [c])
      delta = jax.tree.map(jnp.subtract, solo.params, p0.params)
      sent, expected = t.apply(delta, t.init(delta), jax.random.PRNGKey(0))
      for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    else:  # clients outside the cohort keep theirs (zeros)
      assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(res))
  _, s2 = _round(algo, s1, tiny_data, [1, 2], key=6)
  res0 = [np.asarray(a[0]) for a in jax.tree.leaves(s2.transform_states)]
  for a, b in zip(res0, jax.tree.leaves(s1.transform_states)):
    np.testing.assert_array_equal(a, b[0])  # client 0 sat out round 2: untouched
  d, k = sum(a.size for a in jax.tree.leaves(state.params)), None
  k = round(0.1 * d)
  assert int(m1["bytes_up"]) == 3 * -(-(k * (32 + math.ceil(math.log2(d)))) // 8)
  assert int(m1["bytes_down"]) == 3 * 4 * d


def test_downlink_compression_trains_from_the_decoded_broadcast(tiny_data, tiny_local, tiny_params):
  down = compression.int8()
  algo = FedAvg(tiny_local, downlink=down)
  state = algo.init(*tiny_params)
  m, s = _round(algo, state, tiny_data, [0, 1, 3])
  # the same round run by plain FedAvg from the decoded model gives the same client deltas
  received = down.apply(state.params, down.init(state.params), jax.random.PRNGKey(0))[0]
  plain = FedAvg(tiny_local)
  _, s_plain = _round(plain, plain.init(received, tiny_params[1]), tiny_data, [0, 1, 3])
  for new, p, r, q in zip(*(jax.tree.leaves(t) for t in (s.params, state.params, received, s_plain.params))):
    np.testing.assert_allclose(new - p, q - r, atol=1e-5)  # server model full precision + mean delta
  d = sum(a.size for a in jax.tree.leaves(state.params))
  n_leaves = len(jax.tree.leaves(state.params))
  assert int(m["bytes_down"]) == 3 * -(-(8 * d + 32 * n_leaves) // 8)
  with pytest.raises(ValueError, match="compressor"):
    FedAvg(tiny_local, downlink=clip_l2(1.0))
