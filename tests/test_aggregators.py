"""Aggregators: the protocol's limiting cases, DP noise scale, composition with transforms, and layering."""

import ast
import pathlib

import jax
import numpy as np
import pytest

import fedjax_tl
import fedjax_tl.core.fedavg
from fedjax_tl import aggregators


def _round(algo, tiny_data, tiny_params, ids=(0, 1, 3)):
  s, m = algo.apply(algo.init(*tiny_params, num_clients=5), tiny_data, np.array(ids), jax.random.PRNGKey(0))
  return m, s


def test_dp_fedavg_without_clip_or_noise_is_uniform_fedavg_bit_for_bit(tiny_local, tiny_data, tiny_params):
  _, a = _round(fedjax_tl.FedAvg(tiny_local, schedule="vmap", aggregator=aggregators.UniformMean()), tiny_data,
                tiny_params)
  dp = aggregators.DPFedAvg(clip=float("inf"), noise_multiplier=0.0, cohort_size=3)
  m, b = _round(fedjax_tl.FedAvg(tiny_local, schedule="vmap", aggregator=dp), tiny_data, tiny_params)
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(u, v)
  assert np.asarray(m["client_metrics"]["dp_within_clip"]).tolist() == [1.0, 1.0, 1.0]


def test_dp_fedavg_noise_has_std_z_clip_over_m(tiny_local, tiny_data, tiny_params):
  clip, z, m = 10.0, 0.3, 3
  runs = [_round(fedjax_tl.FedAvg(tiny_local, schedule="vmap", aggregator=aggregators.DPFedAvg(clip, zz, m)),
                 tiny_data, tiny_params)[1] for zz in (0.0, z)]
  noise = np.concatenate([np.ravel(b - a) for a, b in zip(jax.tree.leaves(runs[0].params),
                                                          jax.tree.leaves(runs[1].params), strict=True)])
  assert noise.size > 200
  assert abs(noise.mean()) < 4 * z * clip / m / np.sqrt(noise.size)
  assert noise.std() == pytest.approx(z * clip / m, rel=0.15)  # 2x or 0.5x the scale is rejected


def test_transforms_compose_with_any_aggregator_and_bits_are_exact(tiny_local, tiny_params):
  int8 = fedjax_tl.compression.int8()
  d = sum(a.size for a in jax.tree.leaves(tiny_params[0]))
  for agg, up in [(aggregators.UniformMean(), None), (aggregators.DPFedAvg(1.0, 1.0, 3), None),
                  (aggregators.SecureAggregation(1.0), 32 * d)]:
    algo = fedjax_tl.FedAvg(tiny_local, schedule="vmap", client_transform=int8, aggregator=agg)
    state = algo.init(*tiny_params)
    want = up if up is not None else fedjax_tl.transforms.encoded_bits(int8, state.params)
    assert algo.communication_bits(state)[1] == want + 8 * sum(a.nbytes for a in jax.tree.leaves(state.model_state))


def test_fedavg_imports_no_privacy_mechanism():
  src = pathlib.Path(fedjax_tl.core.fedavg.__file__).read_text()
  imported = [n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
  banned = ("fedjax_tl.aggregators", "fedjax_tl.transforms.secure_agg", "fedjax_tl.transforms.adaptive_clip",
            "fedjax_tl.transforms.privacy")
  assert not [m for m in imported if m in banned]
