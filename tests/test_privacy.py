"""DP-FedAvg transforms and accounting: limiting cases, clipping bound, noise scale (KS test), dp-accounting."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import integrate, optimize, stats

from fedjax_tl.aggregators import UniformMean
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.privacy import accounting
from fedjax_tl.transforms import EmptyState, chain, clip_l2, dp_fedavg, gaussian_noise, identity


def _close(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, **kw)


def test_clip_inf_and_noise_zero_is_plain_fedavg(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(0)
  plain = FedAvg(tiny_local, schedule="vmap", aggregator=UniformMean())
  a, _ = plain.apply(plain.init(params, state), tiny_data, ids, key)
  client, server = dp_fedavg(clip=float("inf"), noise_multiplier=0.0, cohort_size=3)
  dp = FedAvg(tiny_local, schedule="vmap", aggregator=UniformMean(), client_transform=client, server_transform=server)
  b, _ = dp.apply(dp.init(params, state), tiny_data, ids, key)
  _close(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_uniform_weighting_is_the_plain_mean(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  key = jax.random.PRNGKey(1)
  uni = FedAvg(tiny_local, schedule="vmap", aggregator=UniformMean())
  both, _ = uni.apply(uni.init(params, state), tiny_data, np.array([0, 1]), key)
  singles = []
  for c in (0, 1):
    one = FedAvg(tiny_local, schedule="vmap")
    s, _ = one.apply(one.init(params, state), tiny_data, np.array([c]), key)
    singles.append(s.params)
  _close(both.params, jax.tree.map(lambda a, b: (a + b) / 2, *singles), rtol=1e-5, atol=1e-6)


def test_clipped_norms_are_bounded_and_small_updates_untouched():
  t = clip_l2(1.5)
  rng = np.random.default_rng(0)
  for scale in (0.01, 1.0, 100.0):
    u = {"a": jnp.asarray(rng.normal(0, scale, (5, 3))), "b": jnp.asarray(rng.normal(0, scale, 7))}
    out, _ = t.apply(u, t.init(u), jax.random.PRNGKey(0))
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(out))))
    before = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u))))
    assert norm <= 1.5 * (1 + 1e-6)
    if before <= 1.5:
      _close(out, u, rtol=0, atol=0)
    else:  # direction kept
      _close(jax.tree.map(lambda x, n=norm: x / n, out), jax.tree.map(lambda x, b=before: x / b, u),
             rtol=1e-5, atol=1e-7)


def test_noise_scale_passes_ks_and_wrong_scales_fail():
  std = 0.3
  t = gaussian_noise(std)
  zeros = {"w": jnp.zeros((4000,)), "b": jnp.zeros((1000,))}
  noisy, _ = t.apply(zeros, t.init(zeros), jax.random.PRNGKey(0))
  sample = np.concatenate([np.asarray(x) for x in jax.tree.leaves(noisy)])
  assert stats.kstest(sample, "norm", args=(0, std)).pvalue > 0.01
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert stats.kstest(sample, "norm", args=(0, wrong)).pvalue < 1e-6


def test_chain_gives_members_their_own_keys_and_identity():
  t = chain(gaussian_noise(1.0), gaussian_noise(1.0))
  u = {"x": jnp.zeros(1000)}
  out, state = t.apply(u, t.init(u), jax.random.PRNGKey(0))
  assert state == (EmptyState(), EmptyState())
  assert abs(float(out["x"].std()) - np.sqrt(2)) < 0.1  # independent draws add variances
  same, _ = identity().apply(u, identity().init(u), jax.random.PRNGKey(0))
  assert same is u


def _gaussian_delta(eps: float, mu: float) -> float:
  """Exact delta(eps) of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018, Thm. 8)."""
  return stats.norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


def _exact_epsilon(mu: float, delta: float) -> float:
  return optimize.brentq(lambda e: _gaussian_delta(e, mu) - delta, 0.0, 500.0)


@pytest.mark.parametrize("z,rounds", [(1.5, 5), (0.8, 3), (3.0, 50)])
def test_full_cohort_closed_form_bounds_every_accountant(z, rounds):
  # q = 1: `rounds` Gaussian mechanisms on the clipped sum compose to one with mu = sqrt(rounds) * sens / std.
  # Fixed-size sampling is replace-one (sensitivity 2C), Poisson add/remove (sensitivity C); std = z C.
  delta, n = 1e-5, 40
  for sampling, sensitivity in (("fixed", 2.0), ("poisson", 1.0)):
    exact = _exact_epsilon(np.sqrt(rounds) * sensitivity / z, delta)
    reports = {acc: accounting.epsilon(z, n, n, rounds, delta, acc, sampling) for acc in accounting.ACCOUNTANTS}
    for acc, eps in reports.items():
      assert eps >= exact * (1 - 1e-6), (sampling, acc, eps, exact)  # a valid upper bound
    assert reports["pld"] == pytest.approx(exact, rel=0.03), sampling
  # the figure from the bug report: 16.54, not the 7.53 reported before
  assert _exact_epsilon(np.sqrt(5) * 2 / 1.5, 1e-5) == pytest.approx(16.54, abs=0.01)


def test_one_round_of_fixed_size_sampling_matches_numerical_integration():
  # Independent of dp-accounting: the hockey-stick divergence of the replace-one dominating pair for sampling
  # m of n without replacement, P = (1 - q) N(0, z^2) + q N(2, z^2) vs Q = N(0, z^2) and back, integrated
  # numerically; the PLD report must match it and RDP must not be below it.
  z, n, m, delta = 1.2, 40, 10, 1e-4
  q = m / n
  p = lambda x: (1 - q) * stats.norm.pdf(x, 0, z) + q * stats.norm.pdf(x, 2, z)
  qd = lambda x: stats.norm.pdf(x, 0, z)

  def hockey(eps):
    a = integrate.quad(lambda x: max(p(x) - np.exp(eps) * qd(x), 0.0), -40, 40, limit=400, points=[0, 1, 2])[0]
    b = integrate.quad(lambda x: max(qd(x) - np.exp(eps) * p(x), 0.0), -40, 40, limit=400, points=[0, 1, 2])[0]
    return max(a, b)

  exact = optimize.brentq(lambda e: hockey(e) - delta, 1e-3, 50)
  assert accounting.epsilon(z, n, m, 1, delta, "pld", "fixed") == pytest.approx(exact, rel=0.02)
  assert accounting.epsilon(z, n, m, 1, delta, "rdp", "fixed") >= exact


@pytest.mark.parametrize("sampling,slack", [("fixed", 2.5), ("poisson", 1.3)])
def test_rdp_and_pld_agree_within_their_known_slack(sampling, slack):
  # RDP's conversion to (eps, delta) is loose (more so for sampling without replacement); PLD is near-tight.
  for z, n, m, rounds in ((1.5, 1000, 50, 100), (2.0, 200, 20, 200)):
    r = accounting.epsilon(z, n, m, rounds, 1e-5, "rdp", sampling)
    p = accounting.epsilon(z, n, m, rounds, 1e-5, "pld", sampling)
    assert p <= r <= slack * p, (z, n, m, rounds, r, p)


def test_poisson_accounting_matches_dp_accounting_called_directly_and_limits():
  z, n, m, rounds, delta = 1.1, 1000, 10, 100, 1e-5
  a = rdp.RdpAccountant()
  a.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(z)), rounds))
  assert accounting.epsilon(z, n, m, rounds, delta, sampling="poisson") == pytest.approx(a.get_epsilon(delta),
                                                                                          rel=1e-12)
  assert accounting.epsilon(0.0, n, m, rounds, delta) == float("inf")
  assert accounting.epsilon(z, n, m, 0, delta) == 0.0
  assert accounting.epsilon(z, n, m, 200, delta) > accounting.epsilon(z, n, m, 100, delta)
  with pytest.raises(ValueError, match="sampling"):
    accounting.epsilon(z, n, m, 1, delta, sampling="shuffle")
  with pytest.raises(ValueError, match="delta"):
    accounting.epsilon(z, n, m, 1, 0.0)


def test_replace_one_factor_is_applied_exactly_once(monkeypatch):
  assert accounting._replace_one_scale() == 0.5  # dp-accounting <= 0.6 reads z as noise / sensitivity

  class FixedUpstream:  # an upstream that doubles the replace-one sensitivity itself (PR 464)
    def __init__(self, orders, neighboring_relation):
      self._rdp = np.array([4.0])

    def compose(self, event):
      return self

  accounting._replace_one_scale.cache_clear()
  monkeypatch.setattr(accounting.rdp, "RdpAccountant", FixedUpstream)
  try:
    assert accounting._replace_one_scale() == 1.0
  finally:
    accounting._replace_one_scale.cache_clear()


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_calibration_meets_the_target_under_the_corrected_accounting(accountant):
  n, m, rounds, delta = 20, 20, 10, 1e-5
  for target in (1.0, 8.0):
    z = accounting.calibrate_noise_multiplier(target, n, m, rounds, delta, accountant)
    eps = accounting.epsilon(z, n, m, rounds, delta, accountant)
    assert 0.95 * target < eps <= target * (1 + 1e-3)
    # q = 1: the exact epsilon at the calibrated multiplier (replace-one, sensitivity 2C) is within the target
    assert _exact_epsilon(np.sqrt(rounds) * 2 / z, delta) <= target * (1 + 1e-3)
  with pytest.raises(ValueError, match="out of reach"):
    accounting.calibrate_noise_multiplier(1e-3, 10, 10, 10_000, 1e-9, max_noise_multiplier=5.0)


def test_stateful_client_transform_needs_the_population_size(tiny_local, tiny_params):
  from fedjax_tl.transforms import UpdateTransform

  stateful = UpdateTransform(lambda u: {"residual": jax.tree.map(jnp.zeros_like, u)}, lambda u, s, k: (u, s))
  algo = FedAvg(tiny_local, client_transform=stateful)
  with pytest.raises(ValueError, match="num_clients"):
    algo.init(*tiny_params)
  state = algo.init(*tiny_params, num_clients=7)
  assert jax.tree.leaves(state.transform_states)[0].shape[0] == 7


def test_uniform_mean_counts_a_client_without_examples(tiny_local, tiny_params):
  from fedjax_tl.data.client_data import Dataset, FederatedData

  rng = np.random.default_rng(0)
  ds = Dataset(rng.integers(0, 256, (10, 8, 8, 1)).astype(np.uint8), rng.integers(0, 3, 10).astype(np.int32), 3)
  data = FederatedData.from_partition(ds, [np.arange(10), np.array([], np.int64)])
  params, state = tiny_params
  key = jax.random.PRNGKey(0)
  uni = FedAvg(tiny_local, aggregator=UniformMean())
  both, _ = uni.apply(uni.init(params, state), data, np.array([0, 1]), key)
  alone, _ = uni.apply(uni.init(params, state), data, np.array([0]), key)
  # the empty client sends a zero update with weight 1: the mean over the cohort of 2 halves client 0's delta
  _close(jax.tree.map(lambda b, p: b - p, both.params, params), jax.tree.map(lambda a, p: (a - p) / 2, alone.params,
                                                                               params), rtol=1e-5, atol=1e-6)
