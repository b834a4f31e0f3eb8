"""Magnitude pruning, the Zhu & Gupta schedule, masked optimizers and the size report, against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.compress import pruning, report


def _params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"conv0": {"kernel": jax.random.normal(k[0], (3, 3, 2, 5)), "bias": jax.random.normal(k[1], (5,))},
          "head": {"kernel": 3.0 * jax.random.normal(k[2], (17, 7)), "bias": jax.random.normal(k[3], (7,))}}


def _np_keep(scores, s):
  """Reference: prune the floor(s n + 1/2) smallest scores (stable order)."""
  k = math.floor(s * scores.size + 0.5)
  keep = np.ones(scores.size, bool)
  keep[np.argsort(scores, kind="stable")[:k]] = False
  return keep


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_global_pruning_matches_numpy(s):
  p = _params()
  mask = pruning.magnitude_mask(p, s, scope="global")
  kernels = [np.asarray(p["conv0"]["kernel"]), np.asarray(p["head"]["kernel"])]  # tree order: conv0, head
  ref = _np_keep(np.abs(np.concatenate([a.ravel() for a in kernels])), s)
  got = np.concatenate([np.asarray(mask["conv0"]["kernel"]).ravel(), np.asarray(mask["head"]["kernel"]).ravel()])
  np.testing.assert_array_equal(got, ref)
  assert (~got).sum() == math.floor(s * got.size + 0.5)
  assert np.asarray(mask["conv0"]["bias"]).all() and np.asarray(mask["head"]["bias"]).all()  # biases never pruned


@pytest.mark.parametrize("s", [0.25, 0.8])
def test_layerwise_pruning_matches_numpy(s):
  p = _params(1)
  mask = jax.jit(lambda p, s: pruning.magnitude_mask(p, s, scope="layer"))(p, s)  # traced sparsity too
  for name in ("conv0", "head"):
    a = np.asarray(p[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(mask[name]["kernel"]).ravel(), _np_keep(np.abs(a.ravel()), s))
  # the larger-scaled head keeps more weights under global ranking, exactly s under layer-wise
  g = pruning.magnitude_mask(p, s, scope="global")
  assert np.asarray(g["head"]["kernel"]).mean() > np.asarray(mask["head"]["kernel"]).mean()


def test_pruning_zero_ties_and_masked_params_prune_first():
  p = {"kernel": jnp.array([0.0, 0.0, 1.0, -0.5, 0.0, 2.0])}
  mask = pruning.magnitude_mask(p, 0.5)
  np.testing.assert_array_equal(mask["kernel"], [False, False, True, True, False, True])
  pruned = pruning.apply_mask(p, pruning.magnitude_mask(p, 5 / 6))
  np.testing.assert_array_equal(pruned["kernel"], [0, 0, 0, 0, 0, 2.0])
  assert pruning.sparsity(pruned) == pytest.approx(5 / 6)


def test_pruning_errors_name_the_fix():
  with pytest.raises(ValueError, match="scope"):
    pruning.magnitude_mask(_params(), 0.5, scope="channel")
  with pytest.raises(ValueError, match="prunable="):
    pruning.magnitude_mask({"w": jnp.ones(3)}, 0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    pruning.magnitude_mask(_params(), 1.5)


def test_polynomial_schedule_closed_form():
  sf, si, t0, t1, dt = 0.9, 0.1, 10, 50, 5
  for t in range(0, 70):
    tq = min(max(t, t0), t1)
    tq = t0 + ((tq - t0) // dt) * dt
    want = sf + (si - sf) * (1 - (tq - t0) / (t1 - t0)) ** 3
    got = float(pruning.polynomial_sparsity(t, sf, begin_step=t0, end_step=t1, frequency=dt, initial_sparsity=si))
    assert got == pytest.approx(want, abs=1e-6), t
  assert float(pruning.polynomial_sparsity(0, 0.8, end_step=4)) == 0.0
  assert float(pruning.polynomial_sparsity(4, 0.8, end_step=4)) == pytest.approx(0.8)
  assert float(pruning.polynomial_sparsity(2, 0.8, end_step=4)) == pytest.approx(0.8 * (1 - 0.5**3))


@pytest.mark.parametrize("which", ["masked", "keep_pruned"])
def test_masked_weights_stay_zero_through_optimizer_steps(which):
  p = _params()
  mask = pruning.magnitude_mask(p, 0.7)
  p = pruning.apply_mask(p, mask)
  inner = optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.1))  # momentum and decay would move zeros
  opt = pruning.masked(inner, mask) if which == "masked" else pruning.keep_pruned(inner)
  state = opt.init(p)
  loss = lambda q: sum(jnp.sum(jnp.sin(a) + a**2) for a in jax.tree.leaves(q))
  for _ in range(5):
    g = jax.grad(loss)(p)
    u, state = opt.update(g, state, p)
    p = optax.apply_updates(p, u)
  for a, m in zip(jax.tree.leaves(p), jax.tree.leaves(mask)):
    a, m = np.asarray(a), np.asarray(m)
    assert (a[~m] == 0).all()
    assert (a[m] != 0).all()  # the kept weights did train
  # and without the wrapper the same steps move the pruned weights
  state, q = inner.init(p), pruning.apply_mask(p, mask)
  u, _ = inner.update(jax.grad(loss)(q), state, q)
  assert float(jnp.abs(optax.apply_updates(q, u)["head"]["kernel"]).min()) > 0


def test_size_report_counts_exactly():
  p = pruning.apply_mask(_params(), pruning.magnitude_mask(_params(), 0.75, scope="layer"))
  r = report.size_report(p)
  n_conv, n_head = 3 * 3 * 2 * 5, 17 * 7
  nnz_conv, nnz_head = n_conv - math.floor(0.75 * n_conv + 0.5), n_head - math.floor(0.75 * n_head + 0.5)
  assert r["parameters"] == n_conv + n_head + 5 + 7 and r["prunable"] == n_conv + n_head
  assert r["prunable_nonzeros"] == nnz_conv + nnz_head
  assert r["float32_bytes"] == 4 * r["parameters"]
  assert r["int8_bytes"] == n_conv + n_head + 4 * (5 + 7) + 4 * (5 + 7)  # int8 + per-channel scales + biases
  bits = nnz_conv * (32 + math.ceil(math.log2(n_conv))) + nnz_head * (32 + math.ceil(math.log2(n_head))) + 32 * 12
  assert r["sparse_bytes"] == -(-bits // 8)
  assert report.latency_ms(lambda q: q["head"]["kernel"] @ q["head"]["kernel"].T, p, runs=3) > 0
