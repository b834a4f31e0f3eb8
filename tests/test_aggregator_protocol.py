"""The aggregator protocol's declarations: each aggregator says how its messages are reduced (the runner never
guesses from dtypes) and whether averaged model state may travel beside them; aggregate reports a RoundInfo (an
aggregator written for the old dict protocol still works)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_tl as ftl
from fedjax_tl import aggregators
from fedjax_tl.aggregators import SUM, Mean, ModularSum, RoundInfo, covers_model_state, reducer_of
from fedjax_tl.privacy.audit import CanaryAudit
from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy

IDS = np.array([0, 1, 3])


def _round(algo, data, tiny_params, ids=IDS):
  state = algo.init(*tiny_params, num_clients=data.num_clients)
  return algo.apply(state, data, ids, jax.random.PRNGKey(0))


def test_every_aggregator_declares_its_reduction_and_whether_model_state_may_travel_beside_it():
  ftrl = DPFTRL(1.0, 1.0, MFStrategy.toeplitz([1.0]), rounds=2, population=5)
  for agg, reducer, covers in [(aggregators.WeightedMean(), SUM, True), (aggregators.UniformMean(), SUM, True),
                               (aggregators.DPFedAvg(1.0, 1.0, 3), SUM, True),
                               (aggregators.AdaptiveClipping(0.0, 3), SUM, True),
                               (aggregators.SecureAggregation(), ModularSum(32), False),
                               (ftrl, SUM, False)]:  # DP-FTRL declares no reducer: the protocol's default
    assert reducer_of(agg) == reducer and covers_model_state(agg) is covers, agg
  # a wrapper that declares none reduces as what it wraps (the audit's canaries around secure aggregation)
  wrapped = CanaryAudit(num_canaries=4, canary_norm=1.0).wrap(aggregators.SecureAggregation(weighting="uniform"), 5)
  assert reducer_of(wrapped) == ModularSum(32)


@dataclasses.dataclass(frozen=True)
class _FixedPointMean(Mean):
  """A toy secure-aggregation-like mean: weighted updates sent as 2^-16 fixed point in Z_(2^32)."""

  reducer = ModularSum(32)

  def encode(self, delta, num_examples, state, shared, ctx):
    del state, shared
    q = jax.tree.map(lambda d: jnp.round(d * num_examples * 2.0 ** 16).astype(jnp.int32), delta)
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint32), q), num_examples, {}

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    del client_metrics, real, key
    signed = jax.tree.map(lambda s: jax.lax.bitcast_convert_type(s, jnp.int32).astype(jnp.float32) / 2.0 ** 16, total)
    return aggregators.mean_of(signed, weight_sum), state, {}


@dataclasses.dataclass(frozen=True)
class _Undeclared(_FixedPointMean):
  reducer = None  # as an aggregator written before the protocol declared reducers: the weighted float sum


def test_the_runner_reduces_as_the_aggregator_declares_not_by_dtype(tiny_local, tiny_data, tiny_params):
  plain, _ = _round(ftl.FedAvg(tiny_local, schedule="vmap"), tiny_data, tiny_params)
  fixed, _ = _round(ftl.FedAvg(tiny_local, schedule="chunked:2", aggregator=_FixedPointMean()), tiny_data, tiny_params)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(fixed.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)  # the modular sum of the fixed-point values is the sum
  with pytest.raises(TypeError, match=r"declare reducer = ModularSum\(bits\)"):
    _round(ftl.FedAvg(tiny_local, schedule="vmap", aggregator=_Undeclared()), tiny_data, tiny_params)


def test_a_wrapper_without_a_reducer_runs_secure_aggregation_as_the_wrapped_one(tiny_local, tiny_data, tiny_params):
  secagg = ftl.FedAvg(tiny_local, schedule="vmap", model_state="frozen",
                      aggregator=aggregators.SecureAggregation(weighting="uniform", dropout=0.3))
  audited, data = CanaryAudit(num_canaries=4, canary_norm=1.0).attach(secagg, tiny_data)
  a, ma = _round(secagg, tiny_data, tiny_params)
  b, mb = _round(audited, data, tiny_params)  # no canary in the cohort: the same round (another program, so a
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):  # few fixed-point units off)
    np.testing.assert_allclose(u, v, atol=1e-6)
  assert ma["secagg_survivors"] == mb["secagg_survivors"] and ma["bytes_up"] == mb["bytes_up"]


@dataclasses.dataclass(frozen=True)
class _DictProtocol(Mean):
  """An aggregator written for the dict protocol: ``aggregate`` reports senders in a dict, None aborts."""

  abort: bool = False

  def aggregate(self, message_sum, weight_sum, shared, host):
    del shared, host
    return (None if self.abort else message_sum), weight_sum, {"senders": 2, "heard": 2}


def test_round_info_and_the_dict_protocol(tiny_local, tiny_data, tiny_params):
  info = RoundInfo(senders=2, metrics={"heard": 2})
  assert {**info} == {"heard": 2} and RoundInfo.of(None, info).aborted and not RoundInfo.of(1.0, None).aborted
  algo = ftl.FedAvg(tiny_local, schedule="vmap", aggregator=_DictProtocol())
  state, m = _round(algo, tiny_data, tiny_params)
  up = algo.communication_bytes(state)[1]
  assert m["bytes_up"] == 2 * up and m["heard"] == 2 and "senders" not in m
  aborted = ftl.FedAvg(tiny_local, schedule="vmap", aggregator=_DictProtocol(abort=True))
  state, m = _round(aborted, tiny_data, tiny_params)
  assert int(state.round) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny_params[0]), strict=True):
    np.testing.assert_array_equal(a, b)
