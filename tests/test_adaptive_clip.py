"""Adaptive clipping (Andrew et al. 2021): the clip norm tracks a quantile of the clients' update norms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.aggregators import DPFedAvg, UniformMean
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping


def test_clip_norm_converges_to_the_target_quantile():
  norms = jnp.arange(1.0, 21.0)  # 20 clients with update norms 1..20
  for gamma, lo, hi in ((0.5, 9.0, 12.0), (0.9, 17.0, 20.5)):
    ac = AdaptiveClipping(0.0, 20, initial_clip=0.1, target_quantile=gamma, clip_lr=0.2)
    clip = ac.init()
    for _ in range(400):
      below = jnp.sum(norms <= clip)
      _, clip = ac.server_step({"w": jnp.zeros(3)}, below, clip, jax.random.PRNGKey(0))
    assert lo <= float(clip) <= hi, (gamma, float(clip))


def test_client_clip_and_noise_split():
  delta = {"w": jnp.array([3.0, 4.0])}
  clipped, below = AdaptiveClipping.clip(delta, jnp.float32(1.0))
  np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
  assert float(below) == 0.0
  assert float(AdaptiveClipping.clip(delta, jnp.float32(5.0))[1]) == 1.0
  ac = AdaptiveClipping(1.0, 100)  # sigma_b = 5: z_delta = (1 - 1/100)^-1/2
  assert ac.delta_noise_multiplier == pytest.approx(1 / math.sqrt(1 - 0.01))
  with pytest.raises(ValueError, match="count_stddev"):
    AdaptiveClipping(1.0, 10)  # sigma_b = 0.5 is too small for z = 1
  # the mean's noise has std z_delta * C / m
  ac = AdaptiveClipping(1.0, 10, count_stddev=2.0)
  noisy, _ = ac.server_step({"w": jnp.zeros(20000)}, jnp.float32(5), jnp.float32(0.5), jax.random.PRNGKey(1))
  assert float(jnp.std(noisy["w"])) == pytest.approx(ac.delta_noise_multiplier * 0.5 / 10, rel=0.03)


def test_fedavg_with_adaptive_clip(tiny_data, tiny_local, tiny_params):
  ids = np.array([0, 1, 2, 3])
  key = jax.random.PRNGKey(2)
  plain = FedAvg(tiny_local, aggregator=UniformMean())
  s_plain, _ = plain.apply(plain.init(*tiny_params), tiny_data, ids, key)
  ac = AdaptiveClipping(0.0, 4, initial_clip=1e6, target_quantile=0.5, clip_lr=0.2)
  algo = FedAvg(tiny_local, aggregator=ac)
  state = algo.init(*tiny_params)
  s, m = algo.apply(state, tiny_data, ids, key)
  for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(s_plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # a huge clip and no noise: plain uniform FedAvg
  # every client was within the clip, so it shrinks by exp(-0.2 * (1 - 0.5))
  assert float(m["clip_fraction_within"]) == 1.0
  assert float(s.clip_norm) == pytest.approx(1e6 * math.exp(-0.1), rel=1e-5)
  with pytest.raises(ValueError, match="uniform"):
    FedAvg(tiny_local, aggregator=DPFedAvg(weighting="num_examples"))


def test_clip_norm_survives_a_checkpoint(tmp_path, tiny_data, tiny_local, tiny_params):
  from fedjax_tl.checkpoint import Checkpointer

  algo = FedAvg(tiny_local, aggregator=AdaptiveClipping(0.5, 3, count_stddev=1.0))
  state, _ = algo.apply(algo.init(*tiny_params), tiny_data, np.array([0, 1, 3]), jax.random.PRNGKey(0))
  ck = Checkpointer(str(tmp_path), {"run": 1})
  assert ck.maybe_save(state, final=True)
  restored = ck.restore(algo.init(*tiny_params))
  assert int(restored.round) == 1 and float(restored.clip_norm) == float(state.clip_norm) != 0.1
  ck.close()
