"""DP-FTRL: the streaming noise against C^-1 Z in plain numpy, its covariance, the sensitivity against brute force,
epsilon against the Gaussian closed form and jax-privacy's BandMF event, the participation sampler, the schema
guard, the refusals and the privacy statement."""

import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize, stats

from fedjax_tl import keys
from fedjax_tl.aggregators import DPFedAvg, UniformMean
from fedjax_tl.checkpoint import Checkpointer
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.privacy import accounting
from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy, ParticipationSampler, participation_violations
from fedjax_tl.privacy.statement import privacy_statement

BANDED = MFStrategy.toeplitz([1.0, 0.6, 0.35, 0.2])  # non-negative, non-increasing: jax-privacy's exact case
BLT = MFStrategy("blt", buf_decay=(0.9999999789482574, 0.5635240623491226),  # jax-privacy's optimum, n=20, b=4
                 output_scale=(0.07005072092174724, 0.5144471311214224))


def _dense_c(strategy: MFStrategy, n: int) -> np.ndarray:
  """C in plain numpy from the strategy's parameters (not through MFStrategy.matrix)."""
  c = np.zeros((n, n))
  for i in range(n):
    for j in range(i + 1):
      if strategy.kind == "toeplitz":
        c[i, j] = strategy.coefs[i - j] if i - j < len(strategy.coefs) else 0.0
      else:
        pairs = zip(strategy.buf_decay, strategy.output_scale)
        c[i, j] = 1.0 if i == j else sum(s * d ** (i - j - 1) for d, s in pairs)
  return c


def _noise_rounds(agg: DPFTRL, template, n: int, seed: int = 0):
  """The noise the aggregator adds to a zero sum in rounds 0..n-1 (decode with one client of weight 1), and the
  i.i.d. draws Z_t it was made from (the same key derivation as decode's)."""
  state = agg.init(template)
  decode = jax.jit(agg.decode)
  cm = {"dp_schema_ok": jnp.ones(1), "dp_client": jnp.zeros(1, jnp.int32)}
  zero = jax.tree.map(jnp.zeros_like, template)
  outs, zs = [], []
  for t in range(n):
    key = keys.server(keys.round_key(seed, t), "aggregator")
    mean, state, _ = decode(zero, jnp.float32(1.0), state, cm, jnp.ones(1), key)
    outs.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(mean)]))
    leaves = jax.tree.leaves(template)
    ks = jax.random.split(key, len(leaves))
    zs.append(np.concatenate([np.ravel(jax.random.normal(k, x.shape, jnp.float32)) for k, x in zip(ks, leaves)]))
  return np.stack(outs), np.stack(zs)


@pytest.mark.parametrize("strategy", [BANDED, BLT, MFStrategy.identity()], ids=["banded", "blt", "identity"])
def test_streaming_noise_is_c_inverse_z_of_the_strategy(strategy):
  n = 12
  agg = DPFTRL(clip=0.5, noise_multiplier=1.3, strategy=strategy, rounds=n, population=4, min_sep=1)
  template = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
  noise, z = _noise_rounds(agg, template, n)
  expected = agg.noise_std * np.linalg.solve(_dense_c(strategy, n), z.astype(np.float64))
  np.testing.assert_allclose(noise, expected, rtol=2e-4, atol=2e-5 * agg.noise_std)
  assert agg.noise_std == pytest.approx(1.3 * 0.5 * strategy.sensitivity(n, 1))


@pytest.mark.parametrize("strategy", [BANDED, BLT], ids=["banded", "blt"])
def test_noise_covariance_across_rounds_is_what_the_strategy_implies(strategy):
  n, d = 8, 40_000  # every coordinate is an independent draw of the n-round noise vector
  agg = DPFTRL(clip=1.0, noise_multiplier=0.7, strategy=strategy, rounds=n, population=2, min_sep=1)
  noise, _ = _noise_rounds(agg, {"w": jnp.zeros(d)}, n, seed=3)
  empirical = noise @ noise.T / d
  c_inv = np.linalg.inv(_dense_c(strategy, n))
  expected = agg.noise_std ** 2 * c_inv @ c_inv.T
  # standard error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / d); 5 of them is far out for 36 entries
  se = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2) / d)
  assert np.all(np.abs(empirical - expected) < 5 * se), np.max(np.abs(empirical - expected) / se)
  assert not np.allclose(expected, np.diag(np.diag(expected)), atol=0.05 * expected[0, 0])  # really correlated


def _brute_sensitivity(c: np.ndarray, min_sep: int, k: int | None) -> float:
  n, best = len(c), 0.0
  for size in range(1, n + 1):
    if k is not None and size > k:
      break
    for rounds in itertools.combinations(range(n), size):
      if all(b - a >= min_sep for a, b in itertools.pairwise(rounds)):
        best = max(best, float(np.linalg.norm(c[:, list(rounds)].sum(1))))
  return best


@pytest.mark.parametrize("min_sep,k", [(1, None), (3, None), (2, 2), (4, 1), (5, None)])
def test_sensitivity_is_the_worst_participation_pattern(min_sep, k):
  n = 10
  for strategy in (BANDED, BLT, MFStrategy.identity()):
    assert strategy.sensitivity(n, min_sep, k) == pytest.approx(_brute_sensitivity(_dense_c(strategy, n), min_sep, k),
                                                                rel=1e-6), strategy
  wavy = MFStrategy.toeplitz([1.0, -0.4, 0.5])  # not monotone: jax-privacy's general upper bound
  assert wavy.sensitivity(n, min_sep, k) >= _brute_sensitivity(_dense_c(wavy, n), min_sep, k) * (1 - 1e-9)


def _gaussian_epsilon(mu: float, delta: float) -> float:
  """Balle & Wang (2018): the Gaussian mechanism with sensitivity / std = mu is (eps, delta(eps))-DP for
  delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
  f = lambda e: stats.norm.cdf(mu / 2 - e / mu) - math.exp(e) * stats.norm.cdf(-mu / 2 - e / mu) - delta
  return optimize.brentq(f, 0.0, 500.0, xtol=1e-12)


def test_epsilon_is_one_gaussian_mechanism_and_matches_jax_privacy_bandmf():
  from jax_privacy.experimental import accounting as jp_accounting

  n, b, delta = 12, 4, 1e-5
  coefs = np.array([1.0, 0.6, 0.35, 0.2])
  strategy = MFStrategy.toeplitz(coefs / np.linalg.norm(coefs))
  k = math.ceil(n / b)
  for neighbouring, factor in (("replace-one", 2.0), ("zero-out", 1.0)):
    agg = DPFTRL(1.0, 3.0, strategy, n, population=40, min_sep=b, neighbouring=neighbouring)
    assert agg.sensitivity == pytest.approx(math.sqrt(k))  # k disjoint columns of norm 1
    assert agg.epsilon(delta) == pytest.approx(_gaussian_epsilon(factor / 3.0, delta), rel=1e-6)
  # jax-privacy's BandMF accounting (cyclic participation, no sampling): k Gaussians of the multiplier relative to
  # the max column norm, noise / (clip * 1) = z * s; zero-out is its REPLACE_SPECIAL relation
  import dp_accounting

  agg = DPFTRL(1.0, 3.0, strategy, n, population=40, min_sep=b, neighbouring="zero-out")
  event = jp_accounting.amplified_bandmf_event(agg.noise_std, n, num_bands=b, sampling_prob=1.0)
  pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)
  assert agg.epsilon(delta) == pytest.approx(pld, rel=0.02) and agg.epsilon(delta) <= pld * 1.0001
  # calibration hits the target; fewer rounds spend less
  cal = DPFTRL.calibrated(4.0, delta, clip=0.5, strategy=BLT, rounds=20, population=40, min_sep=4)
  assert cal.epsilon(delta) == pytest.approx(4.0, rel=1e-6)
  for t in (1, 3, 4, 5, 11, 19):  # the numpy partial sensitivities are jax-privacy's
    assert cal._partial_sensitivity(t) == pytest.approx(BLT.sensitivity(t, 4), rel=1e-6)  # noqa: SLF001
  spent = [cal.epsilon(delta, t) for t in range(0, 21)]
  assert spent[0] == 0 and all(a <= b + 1e-12 for a, b in itertools.pairwise(spent)) and spent[-1] == spent[20]
  with pytest.raises(ValueError, match="built for 20 rounds"):
    cal.epsilon(delta, 21)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sampler_never_breaks_its_schema(seed):
  cases = [dict(num_clients=30, min_sep=5), dict(num_clients=31, min_sep=4, cohort_size=5),
           dict(num_clients=50, min_sep=6, cohort_size=8, schema="random"),
           dict(num_clients=40, min_sep=3, cohort_size=4, schema="random", max_participations=35),
           dict(num_clients=24, min_sep=3, cohort_size=6, max_participations=90)]
  for kw in cases:
    s = ParticipationSampler(seed=seed, **kw)
    cohorts = s.schedule(300)
    assert participation_violations(cohorts, s.min_sep, s.max_participations) == [], kw
    assert all(len(c) == (kw.get("cohort_size") or len(c)) and len(c) > 0 for c in cohorts)
    assert all(0 <= c.min() and c.max() < s.num_clients for c in cohorts)
    # a resumed run (a fresh sampler asked for a late round first) gets the same cohorts
    again = ParticipationSampler(seed=seed, **kw)
    np.testing.assert_array_equal(again(jax.random.PRNGKey(9), 250), cohorts[250])
  cyclic = ParticipationSampler(30, 5, seed=seed).schedule(50)
  for c in range(30):  # the full cyclic schema: every client exactly every 5 rounds
    rounds = [r for r, ids in enumerate(cyclic) if c in ids]
    assert len(rounds) == 10 and set(np.diff(rounds)) == {5}
  # the check is not vacuous
  assert participation_violations([[1, 2], [3], [1]], 3) == ["round 3: client 1 again after 2 rounds (min_sep 3)"]
  assert participation_violations([[1], [1]], 1, 1) == ["round 2: client 1 takes part for the 2th time (max 1)"]


def test_the_sampler_refuses_what_it_cannot_do():
  with pytest.raises(ValueError, match="needs at least cohort_size"):
    ParticipationSampler(20, 5, cohort_size=5, schema="random")
  with pytest.raises(ValueError, match="smallest of the 4 cyclic groups"):
    ParticipationSampler(10, 4, cohort_size=3)
  s = ParticipationSampler(20, 2, cohort_size=5, schema="random", max_participations=1)
  s.cohort(3)
  with pytest.raises(ValueError, match="Round 5: .* leaves 0 eligible clients"):
    s.cohort(4)


def test_dp_ftrl_in_fedavg_guard_refusals_composition_and_resume(tiny_data, tiny_local, tiny_params, tmp_path):
  params, ms = tiny_params
  n_clients = tiny_data.num_clients  # 5
  # no noise and a clip no update reaches: uniform FedAvg, whatever the strategy and the server optimizer
  sampler = ParticipationSampler(n_clients, 2, cohort_size=2, seed=0)
  ftrl = DPFTRL(1e9, 0.0, BANDED, rounds=4, population=n_clients, min_sep=2)
  a = FedAvg(tiny_local, schedule="vmap", aggregator=ftrl)
  b = FedAvg(tiny_local, schedule="vmap", aggregator=UniformMean())
  sa, ha = run_rounds(a, a.init(params, ms), tiny_data, rounds=4, seed=0, sampler=sampler)
  sb, _ = run_rounds(b, b.init(params, ms), tiny_data, rounds=4, seed=0, sampler=sampler)
  for u, v in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  assert all(h["dp_schema_dropped"] == 0 for h in ha)
  # a sampler that breaks the schema: exactly the repeat participants are dropped (and counted)
  ftrl = DPFTRL.calibrated(4.0, 1e-5, clip=0.1, strategy=BANDED, rounds=3, population=n_clients, min_sep=2)
  algo = FedAvg(tiny_local, schedule="vmap", aggregator=ftrl, server_optimizer=optax.adam(0.01))
  cohorts = [np.array([0, 1, 2]), np.array([1, 3, 4]), np.array([0, 2, 3])]
  state, hist = run_rounds(algo, algo.init(params, ms), tiny_data, rounds=3, seed=0, sampler=lambda k, r: cohorts[r])
  assert [h["dp_schema_dropped"] for h in hist] == [0, 1, 1]  # client 1 in round 2, client 3 in round 3
  assert hist[1]["client_metrics"]["dp_schema_ok"] == [0.0, 1.0, 1.0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))  # composes with a server optimizer
  # the noise buffers and the schema record are checkpointed: a resumed run is bit for bit the uninterrupted one
  half, _ = run_rounds(algo, algo.init(params, ms), tiny_data, rounds=2, seed=0, sampler=lambda k, r: cohorts[r])
  Checkpointer(str(tmp_path), {"run": 1}).maybe_save(half, final=True)
  restored = Checkpointer(str(tmp_path), {"run": 1}).restore(algo.init(params, ms))
  resumed, _ = run_rounds(algo, restored, tiny_data, rounds=1, seed=0, sampler=lambda k, r: cohorts[r])
  for u, v in zip(jax.tree.leaves(state), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  with pytest.raises(ValueError, match="built .* for 3 rounds; round 4"):
    run_rounds(algo, state, tiny_data, rounds=1, seed=0, sampler=lambda k, r: np.array([4]))
  with pytest.raises(ValueError, match="weighting='uniform'"):
    DPFTRL(1.0, 1.0, BANDED, 3, 5, weighting="num_examples")


def test_batchnorm_statistics_in_the_clear_are_refused():
  from fedjax_tl.core.client import LocalTraining
  from fedjax_tl.models import resnet
  from fedjax_tl.models.base import Model

  model = Model(resnet.ClassifierHead(resnet.ResNetTiny(), num_classes=3), (8, 8, 1))
  params, stats = model.init(jax.random.PRNGKey(0))
  ftrl = DPFTRL(1.0, 1.0, BANDED, rounds=3, population=5)
  with pytest.raises(ValueError, match="BatchNorm statistics would be sent in the clear"):
    FedAvg(LocalTraining(model, optax.sgd(0.1), batch_size=4), aggregator=ftrl).init(params, stats)
  FedAvg(LocalTraining(model, optax.sgd(0.1), batch_size=4), aggregator=ftrl, model_state="frozen").init(params, stats)


def test_privacy_statement_and_its_refusals(tiny_local):
  ftrl = DPFTRL.calibrated(8.0, 1e-5, clip=0.5, strategy=BANDED, rounds=10, population=20, min_sep=4)
  sampler = ParticipationSampler(20, 4)
  algo = FedAvg(tiny_local, aggregator=ftrl)
  audit = {"epsilon_audit": 0.4, "epsilon_audit_max": 2.0, "audit_confidence": 0.95, "audit_canaries": 40,
           "audit_held_in": 19}
  s = privacy_statement(algo, population=20, rounds=10, delta=1e-5, sampler=sampler, audit=audit,
                        has_model_state=False)
  assert s["epsilon"] == pytest.approx(8.0) and s["delta"] == 1e-5 and s["epsilon_audit"] == 0.4
  assert s["unit"].startswith("user = client") and "replace-one" in s["neighbouring"]
  assert "cyclic" in s["sampling"] and "no sampling assumption" in s["sampling"]
  assert not any("BatchNorm" in x for x in s["not_covered"]) and any("metrics" in x for x in s["not_covered"])
  assert "epsilon >= 0.400 at 95% confidence" in s["text"]
  with pytest.raises(ValueError, match="ParticipationSampler"):
    privacy_statement(algo, population=20, rounds=10, delta=1e-5)
  with pytest.raises(ValueError, match="looser"):
    privacy_statement(algo, population=20, rounds=10, delta=1e-5, sampler=ParticipationSampler(20, 2))
  dp = FedAvg(tiny_local, aggregator=DPFedAvg(0.5, 1.2, 5))
  s = privacy_statement(dp, population=20, rounds=10, delta=1e-5, accountant="rdp")
  assert s["epsilon"] == accounting.epsilon(1.2, 20, 5, 10, 1e-5, "rdp", "fixed")
  assert "fixed-size cohorts: 5 of the 20" in s["sampling"] and any("BatchNorm" in x for x in s["not_covered"])
  with pytest.raises(ValueError, match="uniformly sampled fixed-size cohorts"):
    privacy_statement(dp, population=20, rounds=10, delta=1e-5, sampler=sampler)
  plain = privacy_statement(FedAvg(tiny_local), population=20, rounds=10, delta=1e-5)
  assert plain["epsilon"] == math.inf and plain["not_covered"][0].startswith("everything")


def test_missing_jax_privacy_names_the_install(monkeypatch):
  for name in [m for m in sys.modules if m == "jax_privacy" or m.startswith("jax_privacy.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "jax_privacy", None)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[privacy\]"'):
    MFStrategy.banded(10, 2)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[privacy\]"'):
    DPFTRL(1.0, 1.0, MFStrategy.toeplitz([1.0, 0.5, 0.25]), rounds=7, population=3)  # (not cached: other rounds)
