"""The CIFAR-10 entry point offline: smoke preset on tfds mock data, clear errors where a download is needed."""

import dataclasses
import json

import jax
import pytest

from fedjax_tl.experiments import cifar10
from fedjax_tl.models import weights

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke preset run once for the module: (workdir, log lines, summary)."""
  workdir = tmp_path_factory.mktemp("smoke")
  cfg = dataclasses.replace(cifar10.PRESETS["smoke"], workdir=str(workdir))
  lines = []
  summary = cifar10.run(cfg, log=lines.append)
  return workdir, lines, summary


def test_smoke_preset_runs_and_writes_results(smoke_run):
  workdir, _, summary = smoke_run
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0
  saved = json.loads((workdir / "results.json").read_text())
  assert [h["round"] for h in saved["history"]] == [1, 2]
  assert all("test_accuracy" in h and h["bytes_up"] > 0 for h in saved["history"])
  assert saved["config"]["model"] == "tiny"


def test_head_only_strategy_sends_only_the_head(smoke_run):
  # against the smoke run (strategy="full", bn="average"): its per-client per-round upload does not depend on the
  # number of rounds, so a second full run is not needed
  cfg = dataclasses.replace(cifar10.PRESETS["smoke"], strategy="head", bn="frozen", rounds=1)
  assert (cifar10.PRESETS["smoke"].strategy, cifar10.PRESETS["smoke"].bn) == ("full", "average")
  lines = []
  cifar10.run(cfg, log=lines.append)
  sizes = [line for line in lines if "MB up" in line]
  lines_full = smoke_run[1]
  mb = lambda ls: float(next(line for line in ls if "MB up" in line).split(": ")[1].split(" MB")[0])
  assert mb(lines) < mb(lines_full), (sizes, lines_full)


def test_seed_preset_offline_stops_at_the_weights_download(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_TL_CACHE", str(tmp_path))
  monkeypatch.delenv("FEDJAX_TL_RESNET50_WEIGHTS", raising=False)
  monkeypatch.setattr(cifar10.weights, "KERAS_RESNET50_NOTOP", dataclasses.replace(
      weights.KERAS_RESNET50_NOTOP, url="http://127.0.0.1:9/resnet50_notop.h5"))  # refused: like no network
  with pytest.raises(weights.WeightFileError, match="--weights_path"):
    cifar10.run(cifar10.PRESETS["seed"], log=lambda *_: None)


def test_missing_dataset_offline_is_a_clear_error(tmp_path):
  cfg = dataclasses.replace(cifar10.PRESETS["smoke"], mock_data=False, data_dir=str(tmp_path))
  import unittest.mock

  with unittest.mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                                  side_effect=OSError("network unreachable")):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
      cifar10.run(cfg, log=lambda *_: None)


def test_bad_config_values():
  for field, value, match in [("model", "resnet9", "--model=.resnet9. is unknown"), ("strategy", "last:9", "last:K"),
                              ("bn", "global", "bn must be"), ("weights", "imagenet21k", "weights must"),
                              ("weights", "timm_x", "weights must"), ("dtype", "float16", "dtype must")]:
    with pytest.raises(ValueError, match=match):
      cifar10.validate(dataclasses.replace(cifar10.PRESETS["seed"], **{field: value}))
  with pytest.raises(ValueError, match="resnet50"):
    cifar10.validate(dataclasses.replace(cifar10.PRESETS["seed"], model="resnet18"))
  bf16 = cifar10.make_model(dataclasses.replace(cifar10.PRESETS["smoke"], dtype="bfloat16"), 10, (32, 32, 3))
  assert bf16.module.dtype == bf16.module.backbone.dtype == jax.numpy.bfloat16


def test_transfer_patterns_select_stages():
  from fedjax_tl.models.transfer import trainable_pattern

  assert trainable_pattern("full") is None
  assert trainable_pattern("last:1") == r"^(head|backbone/conv(5)_)"
  assert trainable_pattern("last:2") == r"^(head|backbone/conv(4|5)_)"


def test_transform_flags_build_the_fedavg_pieces():
  # the digits experiment runs these flags end to end; here: cifar10's config fields map onto FedAvg's
  from fedjax_tl.experiments.common import transform_setup
  from fedjax_tl.transforms.base import encoded_bits

  cfg = dataclasses.replace(cifar10.PRESETS["noniid"], compress="int8", downlink="qsgd:4", secure_agg=True,
                            secagg_clip=2.0, secagg_dropout=0.1, dp_clip=1.0, dp_noise_multiplier=1.0)
  kwargs, eps = transform_setup(cfg, 100, log=lambda *_: None)
  assert set(kwargs) == {"client_transform", "server_transform", "weighting", "downlink", "secure_aggregation"}
  assert kwargs["secure_aggregation"].dropout == 0.1 and kwargs["weighting"] == "uniform"
  template = {"w": jax.numpy.zeros((1000,))}
  assert encoded_bits(kwargs["client_transform"], template) == 8 * 1000 + 32  # clip, then int8
  assert encoded_bits(kwargs["downlink"], template) == 4 * 1000 + 32 * 2
  assert 0 < eps(10)["epsilon"] < eps(100)["epsilon"]
  adaptive = dataclasses.replace(cfg, dp_adaptive=True, dp_count_stddev=1.0, compress="none", downlink="none",
                                 secure_agg=False)
  kwargs, _ = transform_setup(adaptive, 100, log=lambda *_: None)
  assert set(kwargs) == {"adaptive_clip", "weighting"} and kwargs["adaptive_clip"].initial_clip == 1.0
  with pytest.raises(ValueError, match="error feedback"):
    transform_setup(dataclasses.replace(cfg, downlink="topk:0.1"), 100, log=lambda *_: None)
