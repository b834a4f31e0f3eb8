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
