"""Checkpoints: bit-exact resume after SIGKILL, atomic saves, config checks, metrics files and plots."""

import csv
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import resume_worker  # noqa: E402

from fedjax_tl.checkpoint import Checkpointer, ConfigMismatchError  # noqa: E402
from fedjax_tl.experiments.common import ConfigError  # noqa: E402
from fedjax_tl.metrics import read_jsonl  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def _run(*args, expect_rc=0):
  p = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=600)
  assert p.returncode == expect_rc, p.stderr[-2000:]
  return p


def _run_here(*args):
  """The worker's run in this process (only the run that is killed needs a process of its own)."""
  resume_worker.main(*map(str, args))


def _final_state(workdir, **cfg):
  config = resume_worker.Config(workdir=workdir, **cfg)
  _, template, _ = resume_worker.build(config)
  return Checkpointer(workdir, config).restore(template)


def _assert_bit_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("full"))
  _run_here(d, 6, 1, 0, 0)
  return d


@pytest.mark.parametrize("every,kill_after", [(1, 2), (2, 3)])
def test_resume_after_sigkill_is_bit_exact(uninterrupted, tmp_path, capsys, every, kill_after):
  d = str(tmp_path)
  _run(d, 6, every, kill_after, 0, expect_rc=-signal.SIGKILL)
  latest = Checkpointer(d, resume_worker.Config(workdir=d, checkpoint_every=every)).latest_round()
  assert latest == kill_after - kill_after % every  # every=2, killed after round 3: resumes from 2
  with pytest.raises(ConfigError, match="Pass --resume=true to continue that run"):  # never overwritten
    _run_here(d, 6, every, 0, 0)
  capsys.readouterr()
  _run_here(d, 6, every, 0, 1)
  assert f"resumed from the checkpoint of round {latest}" in capsys.readouterr().out
  resumed = _final_state(d, checkpoint_every=every)
  full = _final_state(uninterrupted)
  assert int(resumed.round) == 6
  _assert_bit_identical(resumed, full)  # params, FedBN client states, error-feedback residuals, Adam state, round
  residuals = np.abs(np.asarray(jax.tree.leaves(resumed.transform_states)[0])).reshape(8, -1).sum(1)
  assert (residuals > 0).sum() >= 3  # residuals of every client that took part persist (cohorts of 3 of 8)
  rows = read_jsonl(os.path.join(d, "metrics.jsonl"))
  assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each round exactly once
  full_rows = read_jsonl(os.path.join(uninterrupted, "metrics.jsonl"))
  assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]
  # cumulative megabytes continue across the resume: round r has r rounds' worth
  assert [r["mb_up_total"] for r in rows] == pytest.approx([r["round"] * rows[0]["bytes_up"] / 1e6 for r in rows])
  with open(os.path.join(d, "metrics.csv")) as f:
    table = list(csv.DictReader(f))
  assert [int(r["round"]) for r in table] == [1, 2, 3, 4, 5, 6] and "bytes_up" in table[0]
  assert any(name.startswith("events") for name in os.listdir(os.path.join(d, "tb")))
  assert len(Checkpointer(d, resume_worker.Config(workdir=d)).all_rounds()) <= 2  # keep_checkpoints=2


def test_mismatched_config_is_rejected(uninterrupted):
  config = resume_worker.Config(workdir=uninterrupted, lr=0.2)
  _, template, _ = resume_worker.build(config)
  with pytest.raises(ConfigMismatchError, match="lr: checkpoint 0.05 vs now 0.2"):
    Checkpointer(uninterrupted, config).restore(template)


CRASH_SCRIPT = r"""
import os, signal, sys, threading, time
import jax.numpy as jnp, numpy as np
from fedjax_tl.checkpoint import Checkpointer
sys.path.insert(0, {tests!r})
import resume_worker
cfg = resume_worker.Config(workdir={d!r})
algo, state, data = resume_worker.build(cfg)
ck = Checkpointer({d!r}, cfg)
ck.maybe_save(state._replace(round=jnp.int32(1)))
big = state._replace(round=jnp.int32(2), frozen={{"big": np.ones((64, 1024, 1024), np.float32)}})
def killer():
  root = {d!r} + "/checkpoints"
  while True:
    if any("tmp" in n for n in os.listdir(root)):
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
threading.Thread(target=killer, daemon=True).start()
ck.maybe_save(big)
print("save finished before the kill")
"""


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
  d = str(tmp_path)
  code = CRASH_SCRIPT.format(d=d, tests=os.path.dirname(__file__))
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr[-2000:]
  assert any("tmp" in n for n in os.listdir(os.path.join(d, "checkpoints")))  # the half-written save
  cfg = resume_worker.Config(workdir=d)
  _, template, _ = resume_worker.build(cfg)
  ck = Checkpointer(d, cfg)
  assert ck.latest_round() == 1
  restored = ck.restore(template)
  assert int(restored.round) == 1
  _assert_bit_identical(restored.params, template.params)


def test_plot_writes_pngs(uninterrupted, tmp_path):
  from fedjax_tl.plot import plot_runs

  paths = plot_runs([uninterrupted, uninterrupted], str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy_vs_megabytes.png", "accuracy_vs_round.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)
  with pytest.raises(FileNotFoundError, match="work directory"):
    plot_runs([str(tmp_path / "nope")])


def test_plot_adds_epsilon_when_a_run_reports_it(tmp_path):
  import json

  from fedjax_tl.plot import plot_runs

  run = tmp_path / "dp_run"
  run.mkdir()
  rows = [{"round": r, "test_accuracy": 0.1 * r, "bytes_up": 1000, "bytes_down": 1000, "epsilon": 0.5 * r}
          for r in (1, 2, 3)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  paths = plot_runs([str(run)])
  assert "epsilon_vs_round.png" in [os.path.basename(p) for p in paths]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A work directory with the checkpoints of rounds 1 and 2 (untrained states) and the run's template."""
  import jax.numpy as jnp

  d = str(tmp_path_factory.mktemp("two"))
  cfg = resume_worker.Config(workdir=d)
  _, template, _ = resume_worker.build(cfg)
  ck = Checkpointer(d, cfg)
  for r in (1, 2):
    ck.maybe_save(template._replace(round=jnp.int32(r)))
  ck.close()
  return d, template


def _damage(step_dir, how):
  import glob
  import shutil

  state = os.path.join(step_dir, "state")
  if how == "truncated data file":
    data = max(glob.glob(os.path.join(state, "**", "d", "*"), recursive=True), key=os.path.getsize)
    os.truncate(data, 100)
  elif how == "bad _METADATA":
    with open(os.path.join(state, "_METADATA"), "w") as f:
      f.write("garbage{")
  elif how == "deleted manifests":
    for p in glob.glob(os.path.join(state, "**", "manifest.ocdbt"), recursive=True):
      os.remove(p)
  elif how == "garbage config":
    with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
      f.write("garbage{")
  elif how == "deleted state":
    shutil.rmtree(state)


DAMAGE = ["truncated data file", "bad _METADATA", "deleted manifests", "garbage config", "deleted state"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path, how):
  import shutil

  src, template = two_checkpoints
  d = str(tmp_path / "run")
  shutil.copytree(src, d)
  _damage(os.path.join(d, "checkpoints", "2"), how)
  ck = Checkpointer(d, resume_worker.Config(workdir=d))
  with pytest.warns(UserWarning, match="checkpoint of round 2 in .* is damaged") as warned:
    restored = ck.restore(template)  # (the entry points pass their log instead of warnings.warn)
  assert int(restored.round) == 1
  assert len(warned) == 1 and "does not fit" not in str(warned[0].message)
  assert ck.all_rounds() == [1]  # moved aside, so that round 2 is saved again when the run gets there
  assert os.path.isdir(os.path.join(d, "checkpoints.damaged", "2"))
  ck.close()


def test_no_intact_checkpoint_and_a_different_model_are_named(two_checkpoints, tmp_path):
  import shutil

  import jax.numpy as jnp

  from fedjax_tl.checkpoint import CheckpointCorruptError

  src, template = two_checkpoints
  d = str(tmp_path / "run")
  shutil.copytree(src, d)
  ck = Checkpointer(d, resume_worker.Config(workdir=d))
  with pytest.raises(ConfigMismatchError, match=r"does not fit this model \(7 arrays differ: params/"):
    ck.restore(template._replace(params={"w": jnp.zeros(3)}))  # not damage: nothing is moved
  assert ck.all_rounds() == [1, 2]
  for step in ("1", "2"):
    _damage(os.path.join(d, "checkpoints", step), "garbage config")
  with pytest.raises(CheckpointCorruptError, match="No intact checkpoint.*round 2: its config cannot be read.*"
                     "round 1: its config cannot be read"):
    ck.restore(template, log=lambda _: None)
  ck.close()


def _old_layout(state):
  """A FedAvg ServerState as the dict tree of its layout before the client rows were one store: the fields
  client_states, transform_states, client_params and algorithm_clients instead of clients (None where unused)."""
  return {"params": state.params, "frozen": state.frozen, "model_state": state.model_state,
          "opt_state": state.opt_state, "round": state.round, "client_states": state.client_states,
          "transform_states": state.transform_states, "server_transform_state": state.server_transform_state,
          "aggregator_state": state.aggregator_state, "client_params": state.client_params,
          "algorithm_state": state.algorithm_state, "algorithm_clients": state.algorithm_clients}


def test_a_checkpoint_of_the_layout_before_one_client_row_restores_bit_for_bit(tmp_path):
  import optax

  import fedjax_tl as ftl
  from fedjax_tl.algorithms import Ditto, Scaffold
  from fedjax_tl.transforms import compression

  cfg = resume_worker.Config(workdir=str(tmp_path))
  _, _, data = resume_worker.build(cfg)
  model = resume_worker.Model(resume_worker.Net(), (8, 8, 1))
  params, ms = model.init(jax.random.PRNGKey(0))
  local = ftl.LocalTraining(model, optax.sgd(0.05), 16, steps=2)
  # FedBN statistics, SCAFFOLD's c_i and error-feedback residuals in one row; Ditto's personal params (and their
  # statistics) one level down, in DittoState.personal
  algo = ftl.FedAvg(local, schedule="vmap", model_state="local", hooks=Scaffold(lr=0.05),
                    client_transform=compression.error_feedback(compression.top_k(0.1)))
  template = algo.init(params, ms, num_clients=data.num_clients)
  assert set(template.clients) == {"model_state", "algorithm", "uplink"}
  state, _ = algo.apply(template, data, np.array([1, 4, 6]), jax.random.PRNGKey(1))
  ditto = Ditto(local, lam=0.1, schedule="vmap")
  d_template = ditto.init(params, ms, num_clients=data.num_clients)
  d_state, _ = ditto.apply(d_template, data, np.array([0, 5]), jax.random.PRNGKey(2))
  for name, old, new, tmpl in [("fedavg", _old_layout(state), state, template),
                               ("ditto", {"server": _old_layout(d_state.server),
                                          "personal": _old_layout(d_state.personal)}, d_state, d_template)]:
    d = str(tmp_path / name)
    ck = Checkpointer(d, cfg)
    assert ck.maybe_save(old, round_num=1)  # through orbax, as the Checkpointer of the older code saved it
    restored = ck.restore(tmpl)
    ck.close()
    assert type(restored) is type(new)
    _assert_bit_identical(restored, new)
    assert jax.tree.structure(restored) == jax.tree.structure(new)
  assert set(d_template.personal.clients) == {"model_state", "params"}
  np.testing.assert_array_equal(restored.personal.client_params["Dense_0"]["kernel"],
                                d_state.personal.client_params["Dense_0"]["kernel"])
