"""The experiments' --quantize / --prune flags: parsing, errors, and a tiny digits run with its report."""

import jax
import numpy as np
import pytest

from fedjax_tl.compress import flags
from fedjax_tl.experiments import digits


def test_prune_schedule_parsing():
  fp = flags.parse_prune_schedule("poly", 0.9, rounds=10)
  assert (fp.begin_round, fp.end_round, fp.frequency, fp.final_sparsity) == (0, 5, 1, 0.9)
  fp = flags.parse_prune_schedule("poly:2:8:3", 0.5, rounds=10, scope="layer")
  assert (fp.begin_round, fp.end_round, fp.frequency, fp.scope) == (2, 8, 3, "layer")
  assert float(flags.parse_prune_schedule("start", 0.7, rounds=3).sparsity(0)) == pytest.approx(0.7)
  assert flags.parse_prune_schedule("final", 0.7, rounds=3) is None
  with pytest.raises(ValueError, match="poly:BEGIN:END"):
    flags.parse_prune_schedule("cubic", 0.5, rounds=3)


def test_flag_errors_name_the_fix():
  base = {"local": None, "server_optimizer": None}
  with pytest.raises(ValueError, match="--quantize must be one of"):
    flags.compress_setup(digits.Config(quantize="int4"), base)
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    flags.compress_setup(digits.Config(prune=1.0), base)
  with pytest.raises(ValueError, match="cannot be stacked"):
    flags.compress_setup(digits.Config(prune=0.5, compress="topk:0.1"), base)


def test_digits_run_with_pruning_and_int8_reports(tmp_path):
  pytest.importorskip("qwix")
  cfg = digits.Config(pretrain_epochs=1, rounds=2, num_clients=4, clients_per_round=2, features="4,8", hidden=16,
                      prune=0.5, prune_schedule="poly:0:1", quantize="int8", workdir=str(tmp_path))
  summary = digits.run(cfg, log=lambda *a: None)
  rows = summary["compression"]["pretrained"]
  assert [r["model"] for r in rows] == ["float32 pruned 50%", "int8 dynamic"]
  assert rows[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
  assert rows[1]["bytes"] < rows[0]["bytes"]
  assert all(0 <= r["test_accuracy"] <= 1 and r["latency_ms"] > 0 for r in rows)
  assert (tmp_path / "results.json").exists()
  # the uplink was counted sparse: half of the kernel values (and no indices) plus the dense biases
  model = digits.make_model(cfg, 5)
  params, _ = model.init(jax.random.PRNGKey(0))
  kernels = sum(a.size for p, a in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel")
  dense = sum(a.size for a in jax.tree.leaves(params))
  assert summary["mb_up_total"] < 2 * 2 * 4 * dense / 1e6
  assert np.isclose(summary["mb_up_total"], 2 * (4 * (dense - kernels) + 4 * kernels) / 1e6 + 2 * (
      4 * (dense - kernels) + 4 * round(kernels / 2)) / 1e6, rtol=1e-3)


def test_cifar10_has_the_flags_and_builds_the_pieces():
  import optax

  from fedjax_tl.compress.federated import PruningServerState
  from fedjax_tl.core.client import LocalTraining
  from fedjax_tl.experiments import cifar10
  from fedjax_tl.models.base import Model
  from fedjax_tl.models.cnn import CNN

  cfg, _ = cifar10.parse_config(cifar10.Config, cifar10.PRESETS, ["--preset=smoke", "--prune=0.9",
                                                                  "--prune_schedule=poly:1:3", "--quantize=int8_qat"])
  assert (cfg.prune, cfg.prune_schedule, cfg.quantize) == (0.9, "poly:1:3", "int8_qat")
  local = LocalTraining(Model(CNN(num_classes=3, features=(4,), hidden=8), (8, 8, 1)), optax.sgd(0.1), 4)
  kw, fp = flags.compress_setup(cfg, {"local": local, "server_optimizer": optax.sgd(1.0)}, log=lambda *a: None)
  assert (fp.begin_round, fp.end_round, fp.final_sparsity) == (1, 3, 0.9)
  assert kw["local"].model.module.conv == "xla"  # the QAT model, with convolutions qwix can see
  params = kw["local"].model.init(jax.random.PRNGKey(0))[0]
  assert isinstance(kw["server_optimizer"].init(params), PruningServerState)
  assert kw["client_transform"].encoded_bits is not None and kw["downlink"].encoded_bits is not None


def test_public_api_reaches_compress():
  import fedjax_tl
  from fedjax_tl.compress import FederatedPruning, magnitude_mask, ptq, qat, size_report

  assert fedjax_tl.compress.FederatedPruning is FederatedPruning is fedjax_tl.FederatedPruning
  assert (fedjax_tl.magnitude_mask, fedjax_tl.ptq, fedjax_tl.qat, fedjax_tl.size_report) == (
      magnitude_mask, ptq, qat, size_report)
