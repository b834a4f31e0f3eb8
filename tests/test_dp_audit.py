"""The canary audit: its lower bound exposes a missing noise term and a missing clip far above the claimed epsilon,
stays at most the accountant's epsilon for the calibrated DP-FedAvg and DP-FTRL, and runs inside FedAvg."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.aggregators import DPFedAvg, UniformMean
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.privacy import accounting
from fedjax_tl.privacy.audit import CanaryAudit, audit_mechanism, epsilon_lower_bound
from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy, ParticipationSampler
from fedjax_tl.transforms import dp_fedavg

DELTA = 1e-5
D = 4000  # model size of the mechanism-level audits
REAL, CANARIES, COHORT, ROUNDS = 100, 1000, 80, 50
POPULATION = REAL + CANARIES
AUDIT = CanaryAudit(num_canaries=CANARIES, seed=0, confidence=0.95)
TEMPLATE = {"w": jnp.zeros((D - 40,)), "b": jnp.zeros((40,))}
# fixed-size uniform cohorts, as run_rounds' sample_clients draws them (in numpy: faster under the tests' XLA flags)
UNIFORM = lambda key, r: np.sort(np.random.default_rng([7, r]).choice(POPULATION, COHORT, replace=False))  # noqa: E731
CYCLIC = ParticipationSampler(POPULATION, min_sep=POPULATION // COHORT)  # 20 groups of 60: every 20 rounds
BANDS = MFStrategy.toeplitz([1.0, 0.6, 0.35, 0.2])


# noise multipliers for about epsilon 0.5, 1 and 8 (calibrate_noise_multiplier, PLD, rounded up; calibrating here
# would take ~10 s): each test computes the accountant's epsilon of the z it runs and holds the audit to that
FEDAVG_Z = {0.5: 7.8, 1.0: 4.5, 8.0: 1.45}


def _fedavg_epsilon(z):
  return accounting.epsilon(z, POPULATION, COHORT, ROUNDS, DELTA, "pld", "fixed")


def _ftrl(target=None, z=None):
  kw = dict(clip=1.0, strategy=BANDS, rounds=ROUNDS, population=POPULATION, min_sep=CYCLIC.min_sep)
  return DPFTRL.calibrated(target, DELTA, **kw) if target else DPFTRL(noise_multiplier=z, **kw)


def _client_update(key, template):
  """A real client's synthetic update: twice the clip along a random coordinate (cheaper to draw than the default
  random direction under the tests' unoptimised XLA; the mechanism's guarantee does not depend on it)."""
  flat = jnp.zeros(D).at[jax.random.randint(key, (), 0, D)].set(2.0)
  return {"w": flat[: D - 40], "b": flat[D - 40:]}


def _audit(aggregator, sampler):
  result, history = audit_mechanism(aggregator, AUDIT, TEMPLATE, num_clients=REAL, rounds=ROUNDS, sampler=sampler,
                                    delta=DELTA, client_update=_client_update)
  return result, history


@dataclasses.dataclass(frozen=True)
class _ForgetsToClip(DPFedAvg):
  """A bug: the noise is calibrated to the clip, but the updates are never clipped."""

  def encode(self, delta, num_examples, state, shared, ctx):
    delta, weight, _ = self._MEAN.encode(delta, num_examples, state, shared, ctx)
    return delta, weight, {}


@dataclasses.dataclass(frozen=True)
class _FTRLForgetsToClip(DPFTRL):
  """The same bug in DP-FTRL."""

  def encode(self, delta, num_examples, state, shared, ctx):
    ok = self._eligible(ctx.client_id, state)  # noqa: SLF001
    message = jax.tree.map(lambda d: jnp.where(ok, d, 0.0), delta)
    return message, (ctx.client_id >= 0).astype(jnp.float32), {"dp_schema_ok": ok.astype(jnp.float32),
                                                                "dp_client": ctx.client_id}


def _fields(obj):
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def test_a_missing_noise_term_or_clip_shows_far_above_the_claimed_epsilon():
  z = FEDAVG_Z[0.5]
  claimed = _fedavg_epsilon(z)  # what the runs claim (DP-FTRL is calibrated to the same), as if noised and clipped
  assert 0.4 < claimed <= 0.5
  for name, agg, sampler in [("DP-FedAvg, noise forgotten", DPFedAvg(1.0, 0.0, COHORT), UNIFORM),
                             ("DP-FedAvg, clip forgotten", _ForgetsToClip(1.0, z, COHORT), UNIFORM),
                             ("DP-FTRL, noise forgotten", _ftrl(z=0.0), CYCLIC),
                             ("DP-FTRL, clip forgotten", _FTRLForgetsToClip(**_fields(_ftrl(0.5))), CYCLIC)]:
    result, _ = _audit(agg, sampler)
    assert result["epsilon_audit"] >= 5.0 * claimed, (name, result)
    assert result["audit_auroc"] > 0.85, (name, result)
    assert result["epsilon_audit"] <= result["epsilon_audit_max"]


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_the_calibrated_mechanisms_stay_at_most_the_accountants_epsilon(target):
  z = FEDAVG_Z[target]
  eps_fedavg = _fedavg_epsilon(z)
  assert target * 0.8 < eps_fedavg < target * 1.2
  result, _ = _audit(DPFedAvg(1.0, z, COHORT), UNIFORM)
  assert result["epsilon_audit"] <= eps_fedavg, result
  ftrl = _ftrl(target)
  result, history = _audit(ftrl, CYCLIC)
  assert result["epsilon_audit"] <= ftrl.epsilon(DELTA), result
  assert all(h["dp_schema_dropped"] == 0 for h in history)  # canaries and clients kept the schema


def test_the_lower_bound_from_scores():
  rng = np.random.default_rng(0)
  same = epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500), 0.95, DELTA)
  apart = epsilon_lower_bound(rng.normal(size=500) + 10, rng.normal(size=500), 0.95, DELTA)
  assert same == 0.0 and 4.0 < apart < 6.0
  assert epsilon_lower_bound(np.ones(500), np.zeros(500), 0.99, DELTA) < apart  # more confidence, lower bound


def test_the_audit_in_a_fedavg_run(tiny_data, tiny_local, tiny_params):
  params, ms = tiny_params
  audit = CanaryAudit(num_canaries=200, seed=1)
  algo = FedAvg(tiny_local, schedule="vmap", aggregator=DPFedAvg(clip=0.5, noise_multiplier=0.0, cohort_size=20))
  audited, data = audit.attach(algo, tiny_data)
  assert data.num_clients == tiny_data.num_clients + 200 == audit.population(tiny_data.num_clients)
  assert data.client_sizes[tiny_data.num_clients:].sum() == 0 and audited.aggregator.canary_norm == 50.0
  state, hist = run_rounds(audited, audited.init(params, ms), data, rounds=12, cohort_size=20, seed=0)
  result = audit.result(state, DELTA)
  assert result["audit_rounds"] == 12 and result["audit_canaries"] == 200
  assert result["epsilon_audit"] > 1.5, result  # no noise: the canaries are plain to see in the model
  # the wrapper changes nothing for real clients: a round without canaries is the unaudited round
  ids = np.arange(tiny_data.num_clients)
  a, _ = algo.apply(algo.init(params, ms), tiny_data, ids, jax.random.PRNGKey(3))
  b, _ = audited.apply(audited.init(params, ms), data, ids, jax.random.PRNGKey(3))
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  # refusals, each naming the fix
  client, server = dp_fedavg(0.5, 1.0, 20)
  with pytest.raises(ValueError, match="use aggregator=DPFedAvg"):
    audit.attach(FedAvg(tiny_local, aggregator=UniformMean(), client_transform=client, server_transform=server),
                 tiny_data)
  with pytest.raises(ValueError, match="weight would be 0"):
    audit.attach(FedAvg(tiny_local), tiny_data)  # weighted by examples, which canaries have none of
  with pytest.raises(ValueError, match="canary_norm"):
    audit.attach(FedAvg(tiny_local, aggregator=UniformMean()), tiny_data)
  with pytest.raises(ValueError, match="attach returned"):
    audit.result(algo.init(params, ms), DELTA)


def test_the_docs_example_runs(capsys):
  """docs/privacy.md's example (DP-FTRL, audited, with its privacy statement) runs as written."""
  import pathlib
  import re

  page = pathlib.Path(__file__).parents[1] / "docs" / "privacy.md"
  code = re.search(r"<!-- privacy-example -->\n```python\n(.*?)```", page.read_text(), re.S).group(1)
  namespace = {}
  exec(compile(code, "docs/privacy.md", "exec"), namespace)  # noqa: S102
  statement, history = namespace["statement"], namespace["history"]
  assert statement["epsilon"] == pytest.approx(8.0) and 0 <= statement["epsilon_audit"] <= statement["epsilon"]
  assert len(history) == 6 and all(h["dp_schema_dropped"] == 0 for h in history)
  assert "DP-FTRL (banded Toeplitz, 3 bands)" in capsys.readouterr().out


def test_the_plot_marks_the_audited_lower_bound(tmp_path):
  import json
  import os

  from fedjax_tl.plot import epsilon_series, plot_runs

  rows = [{"round": r, "test_accuracy": 0.1 * r, "bytes_up": 1, "bytes_down": 1, "epsilon": 0.5 * r} for r in (1, 2, 3)]
  rows[-1]["epsilon_audit"] = 0.2
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  series = epsilon_series({"dp": rows})
  assert series["dp"] == ([1, 2, 3], [0.5, 1.0, 1.5]) and series["dp audit lower bound"][:2] == ([3], [0.2])
  assert "epsilon_vs_round.png" in [os.path.basename(p) for p in plot_runs([str(tmp_path)])]
