"""The TPU planner: target names, the libtpu hint, and chunk sizes that fit the budget in the compiled program.

The chunk search runs here on the host's devices (no libtpu needed); with libtpu installed the same checks
run for a v5e target (skipped otherwise: pip install -e ".[tpu]").
"""

import importlib.util
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from fedjax_tl import plan
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.execution import Schedule
from fedjax_tl.experiments import plan as plan_cli
from fedjax_tl.models.base import Model

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


class ConvNet(nn.Module):  # a plain user model: XLA convolution + dense head
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _local():
  return LocalTraining(Model(ConvNet(), (32, 32, 1)), optax.sgd(0.1), batch_size=8, epochs=1)


def test_unknown_target_names_the_choices():
  with pytest.raises(plan.PlanError, match="v5e-1.*spelled 'v5e-4'"):
    plan.resolve_target("v5litepod-4")


def test_missing_libtpu_gives_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
  with pytest.raises(plan.PlanError, match=r'pip install -e "\.\[tpu\]"'):
    plan.target_devices(plan.TARGETS["v5e-1"])


def test_cli_rejects_bad_target_with_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    plan_cli.main(["--target=v9x-1", "--model=tiny", "--weights=none"])
  assert e.value.code == 2
  assert "Unknown target 'v9x-1'" in capsys.readouterr().err


def _chunked_plan_fits(target: str, devices_memory: int | None = None):
  local = _local()
  # Whole-cohort memory first, to set a budget it exceeds.
  devices = plan.target_devices(plan.resolve_target(target))
  full = plan.compile_round(local, devices, cohort_size=32, pad_size=8, num_train=256,
                            schedule=Schedule(0, "scan", 1))
  one = plan.compile_round(local, devices, cohort_size=32, pad_size=8, num_train=256,
                           schedule=Schedule(len(devices), "scan", 1))
  assert one["bytes"] < full["bytes"], (one, full)  # chunking must save memory for the search to mean anything
  budget = (one["bytes"] + full["bytes"]) // 2
  row = plan.plan_round(local, target, cohort_size=32, pad_size=8, num_train=256, hbm_fraction=1.0,
                        memory_bytes=budget, log=lambda *_: None)
  assert row["fits"] and row["bytes_per_device"] <= budget, row
  assert 1 <= row["chunk_size"] < 32 and row["schedule"].startswith("chunked:"), row
  # The row's figure is the compiled program's own: compile the chosen schedule again and compare.
  again = plan.compile_round(local, devices, cohort_size=32, pad_size=8, num_train=256,
                             schedule=Schedule(row["chunk_size"], "scan", 1))
  assert again["bytes"] == row["bytes_per_device"] <= budget
  # Equal chunks: 32 clients in chunks of K pad to at most one chunk's worth of clients.
  assert row["chunks"] * row["chunk_size"] - 32 < row["chunk_size"]
  return row


def test_host_chunk_size_fits_its_budget():
  _chunked_plan_fits("host")


def test_whole_cohort_kept_when_it_fits():
  row = plan.plan_round(_local(), "host", cohort_size=4, pad_size=8, num_train=64, memory_bytes=1 << 30,
                        log=lambda *_: None)
  assert row["fits"] and row["schedule"] == "vmap/scan:1" and row["chunks"] == 1
  assert row["flops_per_round"] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]"')
def test_v5e_default_schedule_compiles_resnet_tiny():
  from fedjax_tl.models import resnet

  model = Model(resnet.ClassifierHead(resnet.ResNetTiny(), num_classes=10, hidden=(16,)), (32, 32, 3))
  local = LocalTraining(model, optax.sgd(0.1), batch_size=8, epochs=1)
  row = plan.plan_round(local, "v5e-1", cohort_size=8, pad_size=16, num_train=256, log=lambda *_: None)
  assert row["fits"] and row["schedule"] == "vmap/scan:1" and row["devices"] == 1
  assert 0 < row["bytes_per_device"] < plan.TARGETS["v5e-1"].hbm_bytes and row["min_round_ms"] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]"')
def test_v5e_chunk_size_fits_its_budget():
  _chunked_plan_fits("v5e-1")


def test_compiler_out_of_memory_is_a_probe_not_a_crash():
  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                       "(31.29G) exceeds available HBM (15.75G).")

  r = plan._try(oom, log=lambda *_: None)
  assert r["oom"] and r["bytes"] == int(31.29 * (1 << 30)) and not plan._fits(r, 1 << 50)
  with pytest.raises(ValueError, match="unrelated"):
    plan._try(lambda: (_ for _ in ()).throw(ValueError("unrelated")), log=lambda *_: None)


def test_plan_compiles_the_algorithms_own_round():
  """An algorithm's round carries more than plain local training: SCAFFOLD's control variates (the server's c
  broadcast to every client, each client's c_i row) are arguments of its program, and error feedback's residual
  rows too; the plan compiles that program, so its argument bytes grow by at least those arrays."""
  import fedjax_tl as ftl

  local = _local()
  devices = plan.target_devices(plan.resolve_target("host"))
  kw = dict(cohort_size=4, pad_size=8, num_train=64, schedule=Schedule(0, "scan", 1))
  plain = plan.compile_round(local, devices, **kw)
  params, _ = local.model.init(jax.random.PRNGKey(0))
  size = sum(a.size * 4 for a in jax.tree.leaves(params))
  scaffold = plan.compile_round(ftl.FedAvg(local, hooks=ftl.Scaffold(0.1)), devices, **kw)
  assert scaffold["argument_bytes"] >= plain["argument_bytes"] + 2 * 4 * size, (scaffold, plain)
  ef = ftl.FedAvg(local, client_transform=ftl.compression.error_feedback(ftl.compression.top_k(0.1)))
  assert plan.compile_round(ef, devices, **kw)["argument_bytes"] >= plain["argument_bytes"] + 4 * size
  row = plan.plan_round(ftl.FedAvg(local, hooks=ftl.Scaffold(0.1)), "host", cohort_size=4, pad_size=8, num_train=64,
                        memory_bytes=1 << 30, log=lambda *_: None)
  assert row["fits"] and row["argument_bytes"] == scaffold["argument_bytes"]


def test_the_schedule_owns_the_backend_choices():
  """Mesh, memory budget and the CPU rewrite are the schedule's, resolved against its target platform: a TPU
  target turns the fast path off (the planner no longer does it by hand); FedAvg's old mesh/memory_budget fields
  fold into its schedule."""
  local = _local()
  cpu = Schedule(0, "scan", 1)
  assert cpu.resolve_local(local) is local and local.fast_path
  tpu = Schedule(0, "scan", 1, platform="tpu")
  assert not tpu.resolve_local(local).fast_path
  assert not Schedule(0, "scan", 1, cpu_rewrite=False).resolve_local(local).fast_path
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("clients",))
  import fedjax_tl as ftl

  algo = ftl.FedAvg(local, schedule="vmap", mesh=mesh, memory_budget=1 << 20)
  assert algo.schedule.mesh is mesh and algo.schedule.memory_budget == 1 << 20
  assert algo.runner(8).mesh is mesh
  assert ftl.FedAvg(local, schedule=Schedule.parse("vmap").on(mesh)).runner(8).mesh is mesh
  with pytest.raises(ValueError, match="platform must be"):
    Schedule(platform="ipu")
