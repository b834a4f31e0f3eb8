"""Pruning and QAT during federated training: masks from the server, zeros kept, sparse bytes, checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.checkpoint import Checkpointer
from fedjax_tl.compress import pruning, report
from fedjax_tl.compress.federated import FederatedPruning, PruningServerState
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg


def _recording(inner):
  """A server optimizer that remembers the last pseudo-gradient it got (= -mean client delta)."""
  def init(params):
    return (inner.init(params), jax.tree.map(jnp.zeros_like, params))

  def update(g, state, params=None):
    u, s = inner.update(g, state[0], params)
    return u, (s, g)

  return optax.GradientTransformation(init, update)


def _kernels(tree):
  return [np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key == "kernel"]


def test_masked_weights_stay_zero_and_are_not_sent(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  fp = FederatedPruning(0.8, end_round=2, begin_round=0)
  algo = FedAvg(**fp.fedavg_kwargs(tiny_local, _recording(optax.sgd(1.0, momentum=0.9))), schedule="vmap")
  s = algo.init(fp.prune(params), state)
  n = sum(a.size for a in _kernels(params))
  ids = np.array([0, 1, 3])
  prev = None
  for r in range(4):
    broadcast = s.params
    zeros = np.concatenate([(a == 0).ravel() for a in _kernels(broadcast)])
    assert zeros.sum() == math.floor(float(fp.sparsity(r)) * n + 0.5)  # the schedule, exactly
    if prev is not None:
      assert zeros[prev].all()  # pruned weights stay pruned
    s, m = algo.apply(s, tiny_data, ids, jax.random.PRNGKey(r))
    mean_delta = s.opt_state.inner[1]
    got = np.concatenate([a.ravel() for a in _kernels(mean_delta)])
    assert (got[zeros] == 0).all() and (got[~zeros] != 0).mean() > 0.5  # clients moved only kept weights
    # bytes: values at the support up (no indices), COO down; non-prunable leaves dense
    dense_rest = sum(a.size for p, a in jax.tree_util.tree_leaves_with_path(broadcast) if p[-1].key != "kernel")
    nnz = int((~zeros).sum())
    assert int(m["bytes_up"]) == len(ids) * -(-(32 * (nnz + dense_rest)) // 8)
    assert int(m["bytes_down"]) == len(ids) * -(-report.sparse_bits(broadcast) // 8)
    prev = zeros
  assert pruning.sparsity(s.params) == pytest.approx(0.8, abs=1 / n)
  assert isinstance(s.opt_state, PruningServerState) and int(s.opt_state.count) == 4
  np.testing.assert_array_equal(np.concatenate([m.ravel() for m in _kernels(s.opt_state.mask)]),
                                np.concatenate([(a != 0).ravel() for a in _kernels(s.params)]))


def test_each_client_delta_is_zero_off_the_mask(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  fp = FederatedPruning(0.6, end_round=1, initial_sparsity=0.6)
  algo = FedAvg(**fp.fedavg_kwargs(tiny_local, _recording(optax.sgd(1.0))), schedule="sequential")
  pruned = fp.prune(params)
  for c in (0, 1, 3):  # a one-client round: the server's pseudo-gradient is minus that client's delta
    s, _ = algo.apply(algo.init(pruned, state), tiny_data, np.array([c]), jax.random.PRNGKey(c))
    for d, p in zip(_kernels(s.opt_state.inner[1]), _kernels(pruned)):
      assert (d[p == 0] == 0).all() and (d[p != 0] != 0).any()


def test_mask_is_checkpointed(tiny_data, tiny_local, tiny_params, tmp_path):
  params, state = tiny_params
  fp = FederatedPruning(0.5, end_round=1)
  algo = FedAvg(**fp.fedavg_kwargs(tiny_local), schedule="vmap")
  s, _ = algo.apply(algo.init(params, state), tiny_data, np.array([0, 1]), jax.random.PRNGKey(0))
  ck = Checkpointer(str(tmp_path), {"run": "prune"})
  ck.maybe_save(s, final=True)
  restored = ck.restore(algo.init(params, state))
  ck.close()
  for a, b in zip(jax.tree.leaves(restored.opt_state.mask), jax.tree.leaves(s.opt_state.mask), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(restored.opt_state.count) == 1 and pruning.sparsity(restored.params) > 0.49


def test_qat_off_equals_float_fedavg_and_int8_differs(tiny_data, tiny_model, tiny_params):
  pytest.importorskip("qwix")
  from fedjax_tl.compress import quantize

  params, state = tiny_params
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(0)

  def one_round(model):
    algo = FedAvg(LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=2), schedule="vmap")
    return algo.apply(algo.init(params, state), tiny_data, ids, key)[0].params

  ref = one_round(quantize.quantizable(tiny_model))
  off = one_round(quantize.qat(tiny_model, weight_qtype=None, act_qtype=None))
  for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(one_round(tiny_model)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # xla conv vs im2col: same function
  q8 = one_round(quantize.qat(tiny_model))
  diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(q8), jax.tree.leaves(ref))]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(q8))  # the server keeps float params
  assert 0 < max(diffs) < 0.05
