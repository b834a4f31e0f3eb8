"""The offline demo end to end on real data (scikit-learn's digits)."""

import dataclasses
import json
import math

import pytest

from fedjax_tl.experiments import digits


def test_default_demo_pretrained_beats_scratch():
  summary = digits.run(digits.PRESETS["default"], log=lambda *_: None)
  acc = summary["final_test_accuracy"]
  assert acc["pretrained"] > acc["scratch"] + 0.05
  assert summary["source_train_accuracy"] > 0.95


def test_cli_overrides_and_unknown_preset():
  cfg, preset = digits.parse_config(digits.Config, digits.PRESETS, ["--preset=smoke", "--rounds=3",
                                                                    "--trainable=head"])
  assert preset == "smoke" and cfg.rounds == 3 and cfg.trainable == "head" and cfg.num_clients == 6
  with pytest.raises(SystemExit):
    digits.parse_config(digits.Config, digits.PRESETS, ["--preset=nope"])


def test_none_text_only_means_none_for_optional_fields():
  from fedjax_tl.experiments import cifar10

  cfg, _ = cifar10.parse_config(cifar10.Config, cifar10.PRESETS, ["--weights=none", "--data_dir=none"])
  assert cfg.weights == "none" and cfg.data_dir is None
  cfg, _ = digits.parse_config(digits.Config, digits.PRESETS, ["--trainable=head"])
  assert cfg.trainable == "head"
  preset = dataclasses.replace(digits.PRESETS["default"], trainable="head")
  cfg, _ = digits.parse_config(digits.Config, {"x": preset}, ["--trainable=none"])
  assert cfg.trainable is None


def test_smoke_preset_with_dp_and_topk_writes_results_epsilon_and_megabytes(tmp_path):
  # one end-to-end run covers the results files, the DP flags and the compression flags (each run compiles
  # two arms, so they share one)
  cfg = dataclasses.replace(digits.PRESETS["smoke"], dp_clip=0.5, dp_epsilon=8.0, compress="topk:0.01",
                            workdir=str(tmp_path))
  lines = []
  summary = digits.run(cfg, log=lines.append)
  assert set(summary["final_test_accuracy"]) == {"pretrained", "scratch"}
  assert all(0 <= a <= 1 for a in summary["final_test_accuracy"].values())
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["history"]["pretrained"]) == cfg.rounds
  assert saved["config"]["rounds"] == cfg.rounds and saved["config"]["compress"] == "topk:0.01"
  assert any("final test accuracy" in line for line in lines)
  rows = [json.loads(x) for x in (tmp_path / "pretrained" / "metrics.jsonl").read_text().splitlines()]
  eps = [r["epsilon"] for r in rows]
  assert 0 < eps[0] < eps[-1] <= 8.0 * (1 + 1e-3)
  assert any("privacy spent" in line for line in lines)
  # the downlink is the dense float32 model (2 rounds x 3 clients x 4 bytes x d); the uplink k = 1% of the
  # coordinates as (float32 value, ceil(log2 d)-bit index) pairs
  d = round(summary["mb_down_total"] * 1e6 / 24)
  k = round(0.01 * d)
  assert summary["mb_up_total"] * 1e6 == 6 * -(-(k * (32 + math.ceil(math.log2(d)))) // 8)
  assert [r["mb_up_total"] for r in rows] == pytest.approx([r["round"] * rows[0]["bytes_up"] / 1e6 for r in rows])
  with pytest.raises(ValueError, match="dp_clip"):
    digits.run(dataclasses.replace(digits.PRESETS["smoke"], dp_epsilon=8.0), log=lambda *_: None)
