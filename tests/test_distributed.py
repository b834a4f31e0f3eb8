"""Several processes on JAX's multi-controller runtime, started here as local CPU processes by the launcher
(python -m fedjax_tl.launch): they meet, see every process's devices, split the population, sum across
processes and agree on the cohort (fedjax_tl/distributed.py)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_tl import distributed, launch

HERE = os.path.dirname(__file__)


def test_process_clients_cover_the_population_once():
  for n, k in [(10, 1), (10, 3), (7, 7), (100, 4)]:
    blocks = [distributed.process_clients(n, i, k) for i in range(k)]
    assert np.array_equal(np.concatenate(blocks), np.arange(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
  with pytest.raises(ValueError, match="3 clients cannot be split over 4 processes"):
    distributed.process_clients(3, 0, 4)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_meet_split_sum_and_agree(processes):
  out = io.StringIO()
  env = {"PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  code = launch.launch([sys.executable, os.path.join(HERE, "distributed_worker.py"), "10"], processes, timeout=240,
                       env=env, out=out)
  text = out.getvalue()
  assert code == 0, text
  results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT " in line),
                   key=lambda r: r["index"])
  assert [r["index"] for r in results] == list(range(processes)), text
  expected_x = float(np.float32(np.sum(np.sqrt(np.arange(10) + 1.0))))
  for r in results:
    assert r["count"] == processes and r["devices"] == processes  # one CPU device per process, seen by all
    assert r["ids"] == [1] * 10  # every client held by exactly one process
    assert r["x"] == pytest.approx(expected_x, rel=1e-6)
    assert r["x"] == results[0]["x"]  # bit-identical on every process
    assert r["cohort"] == results[0]["cohort"]
    assert r["bad"] is not None and "the process index differs between processes" in r["bad"]
  assert sorted(i for r in results for i in r["mine"]) == list(range(10))


def test_a_failing_process_stops_the_others_and_sets_the_exit_code():
  out = io.StringIO()
  script = "import os, sys, time; i = int(os.environ['FEDJAX_TL_PROCESS_ID']); time.sleep(0.2 if i else 60); " \
           "sys.exit(3 if i else 0)"
  code = launch.launch([sys.executable, "-c", script], 2, timeout=30, out=out)
  assert code == 3


def test_launcher_usage_errors():
  r = subprocess.run([sys.executable, "-m", "fedjax_tl.launch", "--processes=0", "--", "true"], capture_output=True,
                     text=True)
  assert r.returncode == 2 and "--processes must be >= 1" in r.stderr
  r = subprocess.run([sys.executable, "-m", "fedjax_tl.launch", "--processes=2"], capture_output=True, text=True)
  assert r.returncode == 2 and "give the command to run after --" in r.stderr


# ---- federated rounds split across processes (tests/round_worker.py) ----
def _round_worker():
  import importlib.util

  spec = importlib.util.spec_from_file_location("round_worker", os.path.join(HERE, "round_worker.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _launch_rounds(processes, out_dir, *args, timeout=120, **kwargs):
  """Runs tests/round_worker.py as ``processes`` processes; returns (exit code, output, seconds)."""
  import time

  out = io.StringIO()
  env = {"PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  t0 = time.monotonic()
  code = launch.launch([sys.executable, os.path.join(HERE, "round_worker.py"), str(out_dir), *map(str, args)],
                       processes, timeout=timeout, env=env, out=out, **kwargs)
  return code, out.getvalue(), time.monotonic() - t0


def _results(out_dir, processes):
  return [dict(np.load(os.path.join(out_dir, f"result.{i}.npz"))) for i in range(processes)]


def _reference(config, rounds):
  """The same rounds in this one process, with the whole population's data (no split)."""
  from fedjax_tl.data.client_data import FederatedData

  w = _round_worker()
  full, parts = w.dataset()
  state, history = w.run(FederatedData.from_partition(full, parts), config, rounds)
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fedjax_tl_reference_{config}_{os.getpid()}.npz")
  w.save(path, state, history)
  ref = dict(np.load(path))
  os.remove(path)
  return ref


def _check_holdings(text, processes):
  w = _round_worker()
  for i in range(processes):
    mine = distributed.process_clients(w.NUM_CLIENTS, i, processes).tolist()
    assert f"[{i}] HOLDS" in text and f"clients {mine}" in text, text  # the worker asserts it holds only these


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("two")
  code, text, seconds = _launch_rounds(2, out, "store", "run", 3)
  assert code == 0, text
  return out, text, seconds


def test_two_processes_run_rounds_like_one(two_process_run):
  """2 processes, each holding only its 4 clients' examples, run 3 rounds of FedAvg (Adam server, per-client heads
  in the store, whole cohort vmapped) and end with the single-process run's params, heads and optimizer state to
  float rounding (the partial sums are added in another order), identical on both processes, with the same
  per-round metrics."""
  out, text, _ = two_process_run
  _check_holdings(text, 2)
  got = _results(out, 2)
  ref = _reference("store", 3)
  for k in ref:
    assert np.array_equal(got[0][k], got[1][k]), k  # every process ends with the same replicated state
    if k.startswith(("params/", "heads/", "opt/")):
      np.testing.assert_allclose(got[0][k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert int(got[0]["round"]) == 3
  np.testing.assert_allclose(got[0]["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(got[0]["client_loss"], ref["client_loss"], rtol=1e-6)


def test_four_processes_with_secure_aggregation_are_bit_exact(tmp_path):
  """4 processes under SecureAggregation (each client's masks depend on its position in the whole cohort, which
  it keeps when its process trains it) with clients trained one by one: the masked sums are integers, so the
  result is bit-identical to the single-process run."""
  code, text, _ = _launch_rounds(4, tmp_path, "secagg", "run", 2)
  assert code == 0, text
  _check_holdings(text, 4)
  got = _results(tmp_path, 4)
  ref = _reference("secagg", 2)
  for k in ref:
    for g in got:
      assert np.array_equal(g[k], ref[k]), k


def test_checkpoint_of_two_processes_resumes_bit_exactly(two_process_run, tmp_path):
  """Both processes save through orbax (process 0 writes the replicated state), stop after round 2, restore and
  run round 3: the same state as the uninterrupted 2-process run, bit for bit."""
  code, text, _ = _launch_rounds(2, tmp_path, "store", "save", 3, 2)
  assert code == 0, text
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["1", "2"]
  code, text, _ = _launch_rounds(2, tmp_path, "store", "resume", 3)
  assert code == 0, text
  assert "[0] RESUMED at round 2" in text and "[1] RESUMED at round 2" in text
  resumed = _results(tmp_path, 2)
  straight = _results(two_process_run[0], 2)[0]
  for k in straight:
    if k.startswith(("params/", "heads/", "opt/", "round")):
      for r in resumed:
        assert np.array_equal(r[k], straight[k]), k


def test_a_killed_process_stops_the_run_under_the_launcher(tmp_path):
  """Process 1 is killed (SIGKILL) after round 1: the launcher says so, stops process 0 and exits 128 + 9."""
  code, text, seconds = _launch_rounds(2, tmp_path, "store", "die", 3, timeout=60)
  assert code == 137, text
  assert "fedjax_tl.launch: process 1 of 2 was killed by SIGKILL; stopping processes [0]" in text, text
  assert seconds < 60


def test_a_killed_process_fails_the_others_without_the_launcher(tmp_path):
  """Started without the launcher (as a cluster's scheduler would), process 1 is killed after round 1: process 0
  fails in the next round's collective with an error saying another process died, and exits non-zero (JAX's
  coordination service ends it once the heartbeat timeout passes), well within a timeout."""
  import time

  address = f"127.0.0.1:{launch.free_port()}"
  procs = []
  t0 = time.monotonic()
  for i in range(2):
    env = {**os.environ, distributed.ENV[0]: address, distributed.ENV[1]: "2", distributed.ENV[2]: str(i),
           distributed.HEARTBEAT_ENV: "3",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "round_worker.py"), str(tmp_path), "store",
                                   "die", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=90)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a process hung after another died")
  assert procs[1].returncode == -9
  assert procs[0].returncode != 0, outs[0]
  assert "ProcessFailedError" in outs[0] and "Another process has most likely died" in outs[0], outs[0]
  assert time.monotonic() - t0 < 90


# ---- ProcessData in this one process ----
def test_process_data_holds_only_its_clients():
  import jax

  from fedjax_tl import ProcessData

  w = _round_worker()
  full, parts = w.dataset()
  data = ProcessData.for_process(full, parts, process_index=1, process_count=2)
  assert data.num_clients == 8 and data.num_local_clients == 4 and list(data.client_ids) == [4, 5, 6, 7]
  assert data.pad_size == max(len(p) for p in parts)  # the population's largest client: every process compiles alike
  assert np.array_equal(np.asarray(data.x), full.x[np.concatenate(parts[4:])])  # its clients' examples, no others
  cohort = data.cohort([5, 7], pad_clients_to=3)
  assert np.asarray(cohort.client_ids).tolist() == [5, 7, -1]  # global ids (keys, rows, hooks)
  x, y, mask = data.gather(cohort)
  assert np.array_equal(np.asarray(x[1])[np.asarray(mask[1])], full.x[parts[7]])
  with pytest.raises(ValueError, match=r"Process 1 does not hold clients \[2\]"):
    data.cohort([2, 5])
  model, algo = w.algorithm("store")
  state = algo.init(*model.init(jax.random.PRNGKey(0)), num_clients=8)
  with pytest.raises(ValueError, match="built for 2 processes, but the run has 1"):
    algo.apply(state, data, np.array([4, 5]), jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="held by \\[0\\] processes instead of exactly one"):
    ProcessData(data.x, data.y, data.client_indices, 3, client_ids=data.client_ids, population=8)


def test_a_round_over_process_data_in_one_process_is_the_plain_round():
  """One process holding every client through ProcessData takes the split path (its part is the whole cohort) and
  gives the plain round's results bit for bit, dropouts included."""
  import jax

  from fedjax_tl import ProcessData
  from fedjax_tl.data.client_data import FederatedData

  w = _round_worker()
  full, parts = w.dataset()
  model, algo = w.algorithm("store")
  results = []
  for data in (FederatedData.from_partition(full, parts), ProcessData.for_process(full, parts)):
    state = algo.init(*model.init(jax.random.PRNGKey(0)), num_clients=8)
    state, _ = algo.apply(state, data, np.array([0, 2, 3, 6, 7]), jax.random.PRNGKey(1))
    state, m = algo.apply(state, data, np.array([1, 2, 5, 7]), jax.random.PRNGKey(2),
                          reported=np.array([True, False, True, True]))
    results.append((jax.tree.leaves((state.params, state.clients, state.opt_state)), m["client_metrics"]["loss"]))
  for a, b in zip(results[0][0], results[1][0]):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert np.array_equal(np.asarray(results[0][1]), np.asarray(results[1][1]))
