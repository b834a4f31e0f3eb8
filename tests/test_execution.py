"""Every schedule equals a plain per-client Python loop; nothing recompiles between rounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.execution import CohortRunner, Schedule, default_schedule
from fedjax_tl.core.fedavg import FedAvg

SCHEDULES = ["vmap", "sequential", "chunked:2", "vmap/scan:3", "sequential/host:1", "sequential/host:4",
             "chunked:2/host:3", "vmap/host:2"]


def reference_client(model, opt, params, x, y, idx, pad, key, batch_size, epochs=None, steps=None):
  """Plain per-client training: variable-size batches, no masking, Python loops.

  Shuffle rule (documented in core/client.py): epoch e orders the client's slots by
  uniform(fold_in(key, e), (pad,)), real slots only.
  """
  n = len(idx)
  opt_state = opt.init(params)

  def loss_fn(p, xb, yb):
    logits, _ = model.apply(p, {}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  spe = math.ceil(n / batch_size)
  total = epochs * spe if steps is None else steps
  losses, seen = 0.0, 0
  for t in range(total):
    e, j = divmod(t, spe)
    noise = np.asarray(jax.random.uniform(jax.random.fold_in(key, e), (pad,)))
    perm = np.argsort(np.where(np.arange(pad) < n, noise, 2.0), kind="stable")[:n]
    b = idx[perm[j * batch_size:(j + 1) * batch_size]]
    loss, g = jax.value_and_grad(loss_fn)(params, x[b], y[b])
    losses += float(loss) * len(b)
    seen += len(b)
    u, opt_state = opt.update(g, opt_state, params)
    params = optax.apply_updates(params, u)
  return params, losses / seen


def reference_round(model, local, params, data, client_ids, round_key):
  x, y = np.asarray(data.x), np.asarray(data.y)
  new, weights, losses = [], [], []
  for c in client_ids:
    idx = np.asarray(data.client_indices[c])
    p, loss = reference_client(model, local.optimizer, params, x, y, idx, data.pad_size,
                               jax.random.fold_in(round_key, c), local.batch_size, local.epochs, local.steps)
    new.append(p)
    weights.append(len(idx))
    losses.append(loss)
  w = np.asarray(weights, np.float64) / sum(weights)
  avg = jax.tree.map(lambda *ps: sum(wi * pi for wi, pi in zip(w, ps)), *new)
  return avg, losses


@pytest.mark.parametrize("spec", SCHEDULES)
def test_schedules_match_plain_python_reference(spec, tiny_model, tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  ids = np.array([0, 1, 2, 4])  # sizes 7, 12, 3, 1: partial batches, and a client smaller than a batch
  key = jax.random.PRNGKey(7)
  algo = FedAvg(tiny_local, schedule=spec)
  new_state, metrics = algo.apply(algo.init(params, state), tiny_data, ids, key)
  expected, losses = reference_round(tiny_model, tiny_local, params, tiny_data, ids, key)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics["client_metrics"]["loss"], losses, rtol=1e-5)
  np.testing.assert_array_equal(metrics["client_metrics"]["num_examples"], [7, 12, 3, 1])


def test_fixed_steps_mode_cycles_epochs(tiny_model, tiny_data, tiny_params):
  params, state = tiny_params
  local = LocalTraining(tiny_model, optax.adam(0.01), batch_size=4, steps=5)
  ids = np.array([2, 3])  # 3 examples (1 step per epoch -> 5 epochs), 9 examples (3 steps per epoch)
  key = jax.random.PRNGKey(1)
  for spec in ("vmap", "sequential/host:2"):
    algo = FedAvg(local, schedule=spec)
    new_state, _ = algo.apply(algo.init(params, state), tiny_data, ids, key)
    expected, _ = reference_round(tiny_model, local, params, tiny_data, ids, key)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_padding_never_touches_training(tiny_model, tiny_data, tiny_params):
  """Poisoning every example outside the cohort and a much larger pad changes nothing for the cohort."""
  from fedjax_tl.data.client_data import FederatedData

  params, state = tiny_params
  ids = np.array([0, 2])
  key = jax.random.PRNGKey(3)
  algo = FedAvg(LocalTraining(tiny_model, optax.sgd(0.1), 4, epochs=2), schedule="vmap")
  ref, _ = algo.apply(algo.init(params, state), tiny_data, ids, key)
  used = np.concatenate([tiny_data.client_indices[i] for i in ids])
  x = np.asarray(tiny_data.x).copy()
  y = np.asarray(tiny_data.y).copy()
  others = np.setdiff1d(np.arange(len(x)), used)
  x[others] = 255
  y[others] = 2
  big = FederatedData(jnp.asarray(x), jnp.asarray(y), tiny_data.client_indices, 3, pad_size=30)
  out, m = algo.apply(algo.init(params, state), big, ids, key)
  # pad_size changes the shuffle draws (uniform over pad slots), so compare against the reference instead
  expected, losses = reference_round(tiny_model, algo.local, params, big, ids, key)
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(m["client_metrics"]["loss"], losses, rtol=1e-5)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(ref.params))


@pytest.mark.parametrize("spec", ["vmap", "sequential/host:4", "chunked:2/host:2"])
def test_no_recompilation_between_rounds(spec, tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  algo = FedAvg(tiny_local, schedule=spec)
  s = algo.init(params, state)
  runner = algo.runner(tiny_data.pad_size)
  s, _ = algo.apply(s, tiny_data, np.array([0, 1, 2]), jax.random.PRNGKey(0))
  s, _ = algo.apply(s, tiny_data, np.array([0, 1, 2]), jax.random.PRNGKey(0))  # acc=None vs acc traces
  after_warmup = runner.trace_count
  for r, ids in enumerate([[3, 4, 1], [4, 2, 0], [1, 3, 4]]):  # different client sizes every round
    s, _ = algo.apply(s, tiny_data, np.array(ids), jax.random.PRNGKey(r))
  assert runner.trace_count == after_warmup


def test_host_loop_compiles_only_the_blocks_that_run(tiny_model, tiny_data, tiny_params):
  """Blocks are compiled on first use: clients with fewer steps than ``unroll`` never compile the unrolled
  block (sequential/host:8 then traces exactly what sequential/host:1 traces); a later round whose client
  needs it compiles it then, once, and the results stay those of the plain per-client reference."""
  params, state = tiny_params
  local = LocalTraining(tiny_model, optax.sgd(0.1), batch_size=2, epochs=1)  # clients 0, 2 run 4, 2 steps
  key = jax.random.PRNGKey(3)
  traces, out = {}, {}
  for spec in ("sequential/host:8", "sequential/host:1"):
    algo = FedAvg(local, schedule=spec)
    s, _ = algo.apply(algo.init(params, state), tiny_data, np.array([0, 2]), key)
    s, _ = algo.apply(s, tiny_data, np.array([2, 0]), key)  # the accumulating finish traces in round 1 already
    traces[spec], out[spec] = algo.runner(tiny_data.pad_size).trace_count, (algo, s)
  assert traces["sequential/host:8"] == traces["sequential/host:1"]
  algo, s = out["sequential/host:8"]
  runner = algo.runner(tiny_data.pad_size)
  algo.apply(s, tiny_data, np.array([1]), key)  # 12 examples: 6 steps < 8, still no block
  assert runner.trace_count == traces["sequential/host:8"]
  big = FedAvg(LocalTraining(tiny_model, optax.sgd(0.1), batch_size=1, epochs=1), schedule="sequential/host:8")
  big_runner = big.runner(tiny_data.pad_size)
  b1, _ = big.apply(big.init(params, state), tiny_data, np.array([2, 4]), key)  # 3 and 1 steps
  before = big_runner.trace_count
  b2, _ = big.apply(b1, tiny_data, np.array([1, 2]), key)  # 12 steps: one block of 8 + 4 single steps
  assert big_runner.trace_count == before + 1
  big.apply(b2, tiny_data, np.array([3, 0]), key)  # 9 and 7 steps: both executables exist
  assert big_runner.trace_count == before + 1
  expected, _ = reference_round(tiny_model, big.local, b1.params, tiny_data, [1, 2], key)
  for a, e in zip(jax.tree.leaves(b2.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


def test_schedule_parsing():
  assert Schedule.parse("vmap") == Schedule(0, "scan", 1)
  assert Schedule.parse("sequential/host:8") == Schedule(1, "host", 8)
  assert Schedule.parse("chunked:16/scan:2") == Schedule(16, "scan", 2)
  assert Schedule.parse(str(Schedule(3, "host", 5))) == Schedule(3, "host", 5)
  assert Schedule.parse("auto") == default_schedule()
  assert default_schedule("cpu").loop == "host" and default_schedule("gpu").chunk_size == 0


def test_auto_schedule_on_cpu_depends_on_xla_convolutions():
  """XLA:CPU runs convolutions inside loop bodies slowly, so only convolution-free models get the one-program
  scan schedule on CPU; accelerators always get the vmapped scan."""
  from fedjax_tl.core.execution import has_convolution
  from fedjax_tl.models.base import Model
  from fedjax_tl.models.cnn import CNN

  local = lambda conv, fast_path=False: LocalTraining(  # noqa: E731
      Model(CNN(num_classes=3, features=(4,), hidden=5, conv=conv), (8, 8, 1)), optax.sgd(0.1), 4, fast_path=fast_path)
  # With the CPU fast path (the default) the model's convolutions become matrix products: the scan schedule.
  assert not has_convolution(local("xla", True))
  assert default_schedule("cpu", local("xla", True)) == Schedule(1, "scan", 1)
  assert has_convolution(local("xla")) and not has_convolution(local("im2col"))
  assert default_schedule("cpu", local("im2col")) == Schedule(1, "scan", 1)
  assert default_schedule("cpu", local("xla")) == Schedule(1, "host", 8)
  assert default_schedule("gpu", local("im2col")) == default_schedule("gpu", local("xla")) == Schedule(0, "scan", 1)
  assert FedAvg(local("xla")).schedule == default_schedule(local=local("xla"))
  assert FedAvg(local("xla"), schedule="vmap").schedule == Schedule(0, "scan", 1)
  for bad in ("vmapp", "chunked:0", "sequential/loop:2", ""):
    with pytest.raises(ValueError):
      Schedule.parse(bad)


def test_runner_rejects_unpadded_cohort(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  runner = CohortRunner(tiny_local, Schedule(2, "host", 2), tiny_data.pad_size)
  with pytest.raises(ValueError, match="pad_clients_to"):
    runner(params, {}, state, tiny_data.x, tiny_data.y, tiny_data.cohort([0, 1, 2]), jax.random.PRNGKey(0))


@pytest.mark.parametrize("budget,expected_chunk", [(1, 1), (2**40, 4)])
def test_memory_sized_chunks(budget, expected_chunk, tiny_model, tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  ids = np.array([0, 1, 2, 4])
  key = jax.random.PRNGKey(7)
  algo = FedAvg(tiny_local, schedule="chunked:auto/host:2", memory_budget=budget)
  new_state, _ = algo.apply(algo.init(params, state), tiny_data, ids, key)
  runner = algo.runner(tiny_data.pad_size)
  assert runner.schedule.chunk_size == expected_chunk  # 1 byte: one client at a time; plenty: the whole cohort
  assert runner.chunk_memory["per_client_bytes"] > sum(a.nbytes for a in jax.tree.leaves(params))
  expected, _ = reference_round(tiny_model, tiny_local, params, tiny_data, ids, key)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  auto = Schedule.parse("chunked:auto")
  assert auto.chunk_size == -1 and str(auto) == "chunked:auto/scan:1"
