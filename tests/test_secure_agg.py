"""Secure aggregation simulation: secret sharing, uniform-looking masked vectors, exact sums, dropouts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_tl.aggregators import Mean, UniformMean
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.transforms.secure_agg import SecureAggregation, shamir_reconstruct, shamir_share


def test_shamir_any_threshold_shares_recover_fewer_cannot():
  rng = np.random.default_rng(0)
  secret = 123456789123456789
  shares = shamir_share(secret, 6, 4, rng)
  assert shamir_reconstruct(shares[2:], 4) == secret
  assert shamir_reconstruct([shares[i] for i in (5, 0, 3, 1)], 4) == secret
  assert shamir_reconstruct(shares[:3] + [(shares[3][0], shares[3][1] + 1)], 4) != secret  # a bad share
  with pytest.raises(ValueError, match="Need 4 shares"):
    shamir_reconstruct(shares[:3], 4)


def _encode_all(sa, deltas, weights, shared, key):
  enc = jax.vmap(sa.client_encode, (0, 0, 0, 0, None))
  n = weights.shape[0]
  return enc(deltas, weights, jnp.arange(n), jax.random.split(key, n), shared)[0]


@functools.cache
def _summed(sa):
  return jax.jit(lambda d, w, s, k: jax.tree.map(lambda a: jnp.sum(a, axis=0, dtype=jnp.uint32),
                                                 _encode_all(sa, d, w, s, k)))


def test_masked_vectors_look_uniform_and_their_sum_is_exact():
  sa = SecureAggregation(clip_value=1.0)
  n, padded = 4, 5
  shared, _ = sa.setup_round(n, padded, jax.random.PRNGKey(3), max_weight=1.0)
  deltas = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(1), (padded, 4000))}
  weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
  key = jax.random.PRNGKey(9)
  masked = _encode_all(sa, deltas, weights, shared, key)["w"]
  unmasked = _encode_all(sa, deltas, weights, shared._replace(signs=jnp.zeros_like(shared.signs)), key)["w"]
  for i in range(n):  # each masked vector alone is indistinguishable from uniform on Z_2^32
    u = np.asarray(masked[i], np.float64) / 2**32
    assert stats.kstest(u, "uniform").pvalue > 1e-3
  assert stats.kstest(np.asarray(unmasked[0], np.float64) / 2**32, "uniform").pvalue < 1e-6  # encodings are not
  total = jnp.sum(masked, axis=0, dtype=jnp.uint32)
  np.testing.assert_array_equal(total, jnp.sum(unmasked, axis=0, dtype=jnp.uint32))  # exact field sum
  decoded = np.asarray(jax.lax.bitcast_convert_type(total, jnp.int32), np.float64) / float(shared.scale)
  truth = np.asarray(deltas["w"][:n], np.float64).sum(0)
  np.testing.assert_allclose(decoded, truth, rtol=0, atol=n / float(shared.scale) + 1e-7)  # rounding only


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("weighting,schedule", [("num_examples", "vmap"), ("uniform", "sequential/host:2")])
def test_secure_fedavg_equals_plain_fedavg(weighting, schedule, tiny_data, tiny_local, tiny_params):
  ids = np.array([0, 1, 3, 4])
  key = jax.random.PRNGKey(4)
  plain = FedAvg(tiny_local, aggregator=Mean(weighting), schedule=schedule)
  s_plain, _ = plain.apply(plain.init(*tiny_params), tiny_data, ids, key)
  secure = FedAvg(tiny_local, schedule=schedule,
                  aggregator=SecureAggregation(clip_value=4.0, weighting=weighting))
  state = secure.init(*tiny_params)
  s_sec, m = secure.apply(state, tiny_data, ids, key)
  assert _max_abs_diff(s_sec.params, s_plain.params) < 1e-5
  assert _max_abs_diff(s_sec.params, state.params) > 1e-3  # and the round did something
  assert m["secagg_survivors"] == 4 and float(m["secagg_clipped_fraction"]) == 0.0
  d = sum(a.size for a in jax.tree.leaves(state.params))
  assert int(m["bytes_up"]) == 4 * 4 * d  # dense 32-bit field elements


def test_dropped_clients_masks_are_recovered(tiny_data, tiny_local, tiny_params):
  ids = np.arange(5)
  sa = SecureAggregation(clip_value=4.0, dropout=0.4, threshold=0.4)
  key = jax.random.PRNGKey(0)
  for seed in range(20):  # a round where some, not all, clients drop out
    key = jax.random.PRNGKey(seed)
    alive = sa.setup_round(5, 5, key, 12.0)[1]["alive"]
    if 2 <= alive.sum() < 5:
      break
  secure = FedAvg(tiny_local, aggregator=sa)
  s_sec, m = secure.apply(secure.init(*tiny_params), tiny_data, ids, key)
  assert m["secagg_dropped"] == 5 - alive.sum() and not m["secagg_aborted"]
  plain = FedAvg(tiny_local)
  s_plain, _ = plain.apply(plain.init(*tiny_params), tiny_data, ids[alive], key)  # the survivors only
  assert _max_abs_diff(s_sec.params, s_plain.params) < 1e-5


def test_too_few_survivors_abort_the_round(tiny_data, tiny_local, tiny_params):
  sa = SecureAggregation(dropout=0.9, threshold=1.0)
  secure = FedAvg(tiny_local, aggregator=sa)
  state = secure.init(*tiny_params)
  s, m = secure.apply(state, tiny_data, np.arange(5), jax.random.PRNGKey(0))
  assert m["secagg_aborted"] and int(s.round) == 1
  assert _max_abs_diff(s.params, state.params) == 0.0


def test_clipping_is_reported_and_bad_settings_refused(tiny_data, tiny_local, tiny_params):
  secure = FedAvg(tiny_local, aggregator=SecureAggregation(clip_value=1e-4))
  _, m = secure.apply(secure.init(*tiny_params), tiny_data, np.arange(5), jax.random.PRNGKey(0))
  assert float(m["secagg_clipped_fraction"]) > 0.1
  with pytest.raises(ValueError, match="dropout"):
    SecureAggregation(dropout=1.0)


def _decode(sa, deltas, weights, shared, key):
  # one compiled program for every cohort size (the shared values are arguments, the padded shapes fixed): run
  # eagerly, each call dispatches the vmapped encoding op by op
  total = _summed(sa)(deltas, weights, shared, key)
  return jax.tree.map(lambda t: np.asarray(jax.lax.bitcast_convert_type(t, jnp.int32), np.float64)
                      / float(shared.scale), total)


def test_sums_at_the_clip_bound_never_wrap_for_any_cohort_size():
  # Every client at (or beyond) +-R on every coordinate: the field sum is n R in magnitude, the largest there is.
  # Before the fix the float32 scale rounded up and the sum wrapped into the opposite sign (3 x 2.0 -> -3.0).
  r, padded = 1.0, 64
  sa = SecureAggregation(clip_value=r)
  pattern = np.array([1.0, -1.0, 2.0, -2.0, 1e6, -1e6, 0.999999, -0.999999], np.float32)
  for n in range(2, padded + 1):
    shared, _ = sa.setup_round(n, padded, jax.random.PRNGKey(n), max_weight=1.0)
    weights = jnp.asarray(np.arange(padded) < n, jnp.float32)
    deltas = {"w": jnp.tile(jnp.asarray(pattern), (padded, 64))}
    got = _decode(sa, deltas, weights, shared, jax.random.PRNGKey(100 + n))["w"]
    want = n * np.clip(np.tile(pattern, 64).astype(np.float64), -r, r)
    # rounding: stochastic (one unit per client) and float32 products (2^-24 relative per client)
    np.testing.assert_allclose(got, want, rtol=0, atol=n / float(shared.scale) + n * r * 2**-23, err_msg=f"n={n}")


def test_a_round_where_every_coordinate_is_clipped(tiny_data, tiny_local, tiny_params):
  # A plain reference: each client's delta from a one-client round, clipped coordinate-wise to R and averaged.
  ids, key, r = np.array([0, 1, 3]), jax.random.PRNGKey(4), 1e-6
  params = tiny_params[0]
  singles = []
  for c in ids:
    one = FedAvg(tiny_local, schedule="vmap", aggregator=UniformMean())
    s = one.apply(one.init(*tiny_params), tiny_data, np.array([c]), key)[0]
    singles.append(jax.tree.map(lambda a, p: np.asarray(a, np.float64) - np.asarray(p, np.float64), s.params, params))
  want = jax.tree.map(lambda *d: np.mean([np.clip(x, -r, r) for x in d], axis=0), *singles)
  secure = FedAvg(tiny_local, schedule="vmap", aggregator=SecureAggregation(r, weighting="uniform"))
  s_sec, m = secure.apply(secure.init(*tiny_params), tiny_data, ids, key)
  got = jax.tree.map(lambda a, p: np.asarray(a, np.float64) - np.asarray(p, np.float64), s_sec.params, params)
  assert float(m["secagg_clipped_fraction"]) > 0.5  # the rest are (near-)zero deltas: dead units, biases
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=0.05 * r)
    clipped_same_sign = np.abs(w) == r
    np.testing.assert_array_equal(np.sign(g[clipped_same_sign]), np.sign(w[clipped_same_sign]))


class _TwoBatchNorms(nn.Module):
  """A conv and two masked BatchNorm layers (four statistics leaves): compiles in seconds where ResNetTiny's
  secure-aggregation round took ~30 s to compile."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    m = None if mask is None else mask[:, None]
    x = nn.Conv(4, (3, 3))(x.astype(jnp.float32))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1), mask=m))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x), mask=m))
    return nn.Dense(3, name="head")(x)


def test_batchnorm_statistics_are_masked_with_the_delta_and_equal_the_plain_run(tiny_data):
  # model_state="average" under secure aggregation: the BatchNorm statistics go through the aggregator in the
  # message's mean part (masked, weighted like the delta) instead of being refused. Each client's weighted value is
  # off by less than 1/scale per coordinate after stochastic rounding, so the means (params and statistics) are off
  # by at most n * max_weight / (scale * W), plus float32 rounding of the scaled values (rtol). (The unweighted mean
  # of the statistics is ~1e-3 away from the weighted one here, far outside that bound.)
  import optax

  from fedjax_tl.aggregators.secure import fixed_point_scale
  from fedjax_tl.core.client import LocalTraining
  from fedjax_tl.models.base import Model

  model = Model(_TwoBatchNorms(), (8, 8, 1))
  params, stats = model.init(jax.random.PRNGKey(0))
  local = LocalTraining(model, optax.sgd(0.001), batch_size=4)
  ids, key, r = np.array([0, 1, 3]), jax.random.PRNGKey(4), 64.0
  # One schedule for both: BatchNorm on raw uint8 pixels amplifies the float rounding by which the vmapped
  # programs differ (with a BatchNorm ResNet the plain run alone moved by ~1e-3 between "vmap" and "sequential").
  plain = FedAvg(local, schedule="sequential")
  secure = FedAvg(local, schedule="sequential", aggregator=SecureAggregation(clip_value=r))
  a, m = secure.apply(secure.init(params, stats), tiny_data, ids, key)
  b, _ = plain.apply(plain.init(params, stats), tiny_data, ids, key)
  assert float(m["secagg_clipped_fraction"]) == 0.0
  n, w = len(ids), tiny_data.client_sizes[ids].astype(np.float64)
  bound = n * float(tiny_data.pad_size) / (fixed_point_scale(n, r) * w.sum())
  assert jax.tree.leaves(a.model_state)
  for got, want, before in [(a.params, b.params, params), (a.model_state, b.model_state, stats)]:
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=bound)
    assert _max_abs_diff(want, before) > 0  # the round moved them
  assert secure.communication_bits(a) == plain.communication_bits(b)  # the statistics are sent either way


def test_scaffold_under_secure_aggregation_equals_scaffold_within_the_fixed_point_bound(tiny_data, tiny_local,
                                                                                         tiny_params):
  # SCAFFOLD's control-variate update is masked with the delta (unweighted: the message's sum part). The params
  # are off by at most n * max_weight / (scale * W) (the weighted mean), the server's control variate, the sum of
  # the updates over N clients, by at most n / (scale * N).
  from fedjax_tl import Scaffold
  from fedjax_tl.aggregators.secure import fixed_point_scale

  ids, key, r = np.array([0, 1, 3]), jax.random.PRNGKey(4), 16.0
  plain = FedAvg(tiny_local, schedule="vmap", hooks=Scaffold(0.1))
  secure = FedAvg(tiny_local, schedule="vmap", hooks=Scaffold(0.1), aggregator=SecureAggregation(clip_value=r))
  a, m = secure.apply(secure.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  b, _ = plain.apply(plain.init(*tiny_params, num_clients=5), tiny_data, ids, key)
  assert float(m["secagg_clipped_fraction"]) == 0.0
  n, scale, w = len(ids), fixed_point_scale(len(ids), r), tiny_data.client_sizes[ids].astype(np.float64)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=n * float(tiny_data.pad_size) / (
        scale * w.sum()))
  for x, y in zip(jax.tree.leaves(a.algorithm_state), jax.tree.leaves(b.algorithm_state), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=n / (scale * 5))
  assert _max_abs_diff(b.algorithm_state, jax.tree.map(jnp.zeros_like, b.algorithm_state)) > 0
  for x, y in zip(jax.tree.leaves(a.clients), jax.tree.leaves(b.clients), strict=True):  # the clients' own c_i
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_adaptive_clipping_under_secure_aggregation_masks_its_bits(tiny_data, tiny_local, tiny_params):
  """SecureAggregation(inner=AdaptiveClipping): the clip bits travel masked in the message (no per-client metric
  left in the clear) and the result is adaptive clipping's own within secure aggregation's fixed-point rounding: the
  same params and clip norm after 3 rounds."""
  import fedjax_tl as ftl

  params, state = tiny_params
  ac = ftl.AdaptiveClipping(noise_multiplier=0.0, cohort_size=3, initial_clip=0.05, target_quantile=0.5)
  alone = ftl.FedAvg(tiny_local, schedule="sequential", aggregator=ac)
  masked = ftl.FedAvg(tiny_local, schedule="sequential",
                      aggregator=ftl.SecureAggregation(clip_value=2.0, weighting="uniform", inner=ac))
  s1, s2 = alone.init(params, state), masked.init(params, state)
  for r in range(3):
    key = jax.random.PRNGKey(r)
    s1, m1 = alone.apply(s1, tiny_data, np.array([0, 1, 3]), key)
    s2, m2 = masked.apply(s2, tiny_data, np.array([0, 1, 3]), key)
    assert "below_clip" not in m2["client_metrics"]
    np.testing.assert_allclose(float(m2["clip_fraction_within"]), float(m1["clip_fraction_within"]), atol=1e-3)
  np.testing.assert_allclose(float(s2.clip_norm), float(s1.clip_norm), rtol=1e-3)
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
  assert float(s1.clip_norm) != 0.05  # the norm moved: the bits were counted
  with pytest.raises(ValueError, match="clip_value >= 1"):
    ftl.SecureAggregation(clip_value=0.5, inner=ac)
