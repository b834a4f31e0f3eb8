"""Bad inputs at the command line and in the work directory: one-line errors (exit 2) before any data is
loaded or trained on, --help with the preset's values, and no silent fallbacks."""

import dataclasses
import io
import json
import os
import sys
import time

import pytest
from conftest import WorkStarted as _WorkStarted

from fedjax_tl.experiments import cifar10, common, diabetes, digits, rules, text
from fedjax_tl.experiments import plan as plan_cli

BAD_FLAGS = [
    (digits, ["--rounds=0"], "--rounds must be a positive integer"),
    (digits, ["--rounds=-3"], "--rounds must be a positive integer"),
    (digits, ["--round=1"], "unrecognized arguments: --round=1"),  # no prefix matching to --rounds
    (digits, ["--target_labels=5,6,12"], "[12] not digits"),
    (digits, ["--source_labels=0,1,10"], "[10] not digits"),
    (digits, ["--target_labels=5,x"], "expected comma-separated integers"),
    (digits, ["--target_labels=5,5,6"], "repeats a label"),
    (digits, ["--dp_epsilon=-1", "--dp_clip=0.5"], "--dp_epsilon must be >= 0"),
    (digits, ["--dp_epsilon=-1"], "--dp_epsilon must be >= 0"),
    (digits, ["--dp_noise_multiplier=1.0"], "needs a clipping norm"),
    (digits, ["--dp_clip=0.5", "--dp_epsilon=8", "--dp_noise_multiplier=1"], "not both"),
    (digits, ["--clients_per_round=50"], "exceeds --num_clients"),
    (digits, ["--compress=topk"], "--compress: Cannot parse"),
    (digits, ["--client_optimizer=adamw"], "--client_optimizer='adamw' is unknown"),
    (digits, ["--resume=true"], "--resume=true needs the --workdir"),
    (digits, ["--seed=-1"], "--seed must be >= 0"),
    (digits, [f"--workdir={__file__}/run"], "cannot write under"),  # below a file
    (cifar10, ["--preset=smoke", "--image_size=0"], "--image_size must be a positive"),
    (cifar10, ["--preset=smoke", "--image_size=-5"], "--image_size must be a positive"),
    (cifar10, ["--preset=smoke", "--rounds=0"], "--rounds must be a positive integer"),
    (cifar10, ["--preset=smoke", "--strategy=last:9"], "--strategy"),
    (cifar10, ["--preset=smoke", "--weights_path=/nonexistent.h5"], "does not exist"),
]


@pytest.mark.parametrize("module,argv,message", BAD_FLAGS, ids=[" ".join(a) for _, a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_usage_errors_before_any_work(no_work, capsys, module, argv, message):
  t = time.perf_counter()
  with pytest.raises(SystemExit) as e:
    module.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  error_lines = [line for line in err.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and message in error_lines[0], err
  assert "Traceback" not in err
  assert time.perf_counter() - t < 5


def test_help_shows_the_preset_values(capsys):
  with pytest.raises(SystemExit) as e:
    digits.main(["--help"])
  assert e.value.code == 0
  out = " ".join(capsys.readouterr().out.split())
  assert "default: None" not in out
  assert "--rounds ROUNDS default: 10 (smoke: 2)" in out
  assert "--target_labels TARGET_LABELS default: 5,6,7,8,9" in out
  with pytest.raises(SystemExit):
    cifar10.main(["--preset=smoke", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "--model MODEL default: tiny (seed: resnet50; noniid: resnet50)" in out
  assert "--data_dir DATA_DIR default: none" in out


def test_missing_tfds_extra_names_the_install_command(no_work, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
  with pytest.raises(SystemExit) as e:
    cifar10.main(["--preset=smoke"])
  assert e.value.code == 2
  assert 'pip install -e ".[tfds]"' in capsys.readouterr().err


def test_user_errors_at_run_time_end_without_a_traceback(capsys):
  from fedjax_tl.checkpoint import CheckpointCorruptError

  def run(cfg):
    raise CheckpointCorruptError("No intact checkpoint in /x/checkpoints: round 2: its config cannot be read.")

  with pytest.raises(SystemExit) as e:
    common.cli_main(run, digits.Config, digits.PRESETS, ["--preset=smoke"], "", digits.validate)
  assert e.value.code == 1
  assert capsys.readouterr().err == f"{os.path.basename(sys.argv[0])}: error: No intact checkpoint in " \
                                    "/x/checkpoints: round 2: its config cannot be read.\n"


def test_dp_clip_without_noise_says_there_is_no_privacy():
  import dataclasses

  lines = []
  cfg = dataclasses.replace(digits.PRESETS["smoke"], dp_clip=0.5)
  common.transform_setup(cfg, 6, log=lines.append)
  assert any("adds no noise: no privacy" in line for line in lines)


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_resume_without_checkpoint_warns_and_progress_bar_follows_the_terminal(
    tiny_local, tiny_data, tiny_params, tmp_path, monkeypatch):
  import dataclasses

  from fedjax_tl.core.fedavg import FedAvg

  algo = FedAvg(tiny_local, schedule="sequential/host:1")
  cfg = dataclasses.replace(digits.PRESETS["smoke"], rounds=1, resume=True)
  assert cfg.quiet is None and cifar10.PRESETS["seed"].quiet is None  # the default: a bar on a terminal
  for tty in (True, False):
    stderr = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    lines = []
    common.run_in_workdir(cfg, algo, algo.init(*tiny_params), tiny_data, rounds=1, cohort_size=2,
                          evaluate_fn=None, workdir=str(tmp_path / f"run{tty}"), log=lines.append)
    assert any("holds no checkpoint: starting this run from round 0" in line for line in lines), lines
    assert ("rounds" in stderr.getvalue()) == tty  # the tqdm bar
  # without a workdir too (the digits demo's default)
  monkeypatch.setattr(sys, "stderr", _Terminal())
  common.run_in_workdir(dataclasses.replace(cfg, resume=False), algo, algo.init(*tiny_params), tiny_data,
                        rounds=1, cohort_size=2, evaluate_fn=None, workdir=None)
  assert "1/1" in sys.stderr.getvalue()


def test_junk_metrics_file_is_named_with_its_line(tmp_path):
  from fedjax_tl.metrics import MetricsWriter

  rows = [json.dumps({"round": r, "train_loss": 1.0}) for r in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a metrics row"):  # MetricsFileError
    MetricsWriter(str(tmp_path), 3, resume_round=2, quiet=True, tensorboard=False)
  (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n" + json.dumps({"loss": 1}) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a metrics row"):
    MetricsWriter(str(tmp_path), 3, resume_round=2, quiet=True, tensorboard=False)
  # a record cut off by a kill during the append is dropped: the run resumes from its checkpoint anyway
  (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n" + rows[1][:7])
  w = MetricsWriter(str(tmp_path), 3, resume_round=2, quiet=True, tensorboard=False)
  w.close()
  assert [r["round"] for r in w.rows] == [1]
  assert os.path.getsize(tmp_path / "metrics.jsonl") == len(rows[0]) + 1


def test_many_mismatched_weights_are_summarised():
  import numpy as np

  from fedjax_tl.models.pretrained import WeightMismatchError, merge

  init = {f"conv{i}_conv": {"kernel": np.zeros((1, 1, 2, 2))} for i in range(100)}
  loaded = {f"layer{i}": {"kernel": np.zeros((1, 1, 2, 2))} for i in range(107)}
  with pytest.raises(WeightMismatchError) as e:
    merge(init, loaded)
  msg = str(e.value)
  assert len(msg.splitlines()) <= 4 and len(msg) < 1200, msg
  assert "100 of the model's 100 parameters missing" in msg and "(and 95 more)" in msg
  assert "107 of the 107 loaded parameters not in the model" in msg and "conv0_conv/kernel (1, 1, 2, 2)" in msg


def test_weights_file_with_other_layer_names_gets_a_short_message(tmp_path):
  # an h5 in the legacy Keras layout whose layers are not Keras ResNet50's (e.g. another architecture's file)
  import dataclasses

  import h5py
  import numpy as np

  from fedjax_tl.models.pretrained import WeightMismatchError

  path = str(tmp_path / "other.h5")
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [f"block{i}_conv".encode() for i in range(60)]
    for i in range(60):
      g = f.create_group(f"block{i}_conv")
      g.attrs["weight_names"] = [f"block{i}_conv/kernel:0".encode(), f"block{i}_conv/bias:0".encode()]
      g.create_dataset(f"block{i}_conv/kernel:0", data=np.zeros((1, 1, 2, 2), np.float32))
      g.create_dataset(f"block{i}_conv/bias:0", data=np.zeros(2, np.float32))
  cfg = dataclasses.replace(cifar10.PRESETS["seed"], weights_path=path)
  loaded = cifar10.load_pretrained(cfg, log=lambda *_: None)

  class ResNetLike:  # the parameter names of the Flax ResNet50 (init without compiling one, for speed)
    def init(self, key):
      del key
      convs = [f"conv{s}_block{b}_{i}_conv" for s in (2, 3, 4, 5) for b in (1, 2, 3) for i in (1, 2, 3)]
      params = {"backbone": {n: {"kernel": np.zeros((1, 1, 2, 2), np.float32)} for n in ["conv1_conv"] + convs},
                "head": {"kernel": np.zeros((2, 10), np.float32)}}
      return params, {"batch_stats": {"backbone": {}}}

  model = ResNetLike()
  with pytest.raises(WeightMismatchError) as e:
    cifar10.init_params(cfg, model, loaded)
  msg = str(e.value)
  assert len(msg.splitlines()) <= 4 and len(msg) < 2000, msg
  assert f"weights ({path}) do not fit model=resnet50" in msg and "--weights_path" in msg
  assert "37 of the model's 38 parameters missing from the loaded weights: backbone/conv1_conv/kernel " in msg
  print(f"{len(msg.splitlines())} lines, {len(msg)} characters:\n{msg}")
  assert "120 of the 120 loaded parameters not in the model: backbone/block0_conv/bias (2,)" in msg


def test_unknown_dataset_is_a_flag_error(capsys):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(SystemExit) as e:
    cifar10.main(["--preset=smoke", "--mock_data=false", "--dataset=no_such_dataset"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "error: --dataset=no_such_dataset: Unknown tfds dataset" in err and "Traceback" not in err


def test_a_split_that_cannot_be_made_fails_before_the_pretraining(monkeypatch, capsys):
  def stop(*_, **__):
    raise _WorkStarted

  monkeypatch.setattr(digits, "pretrain", stop)
  with pytest.raises(SystemExit) as e:
    digits.main(["--preset=smoke", "--num_clients=2000"])
  assert e.value.code == 2
  assert "error: --partition=dirichlet, --num_clients=2000: Cannot give 2000 clients" in capsys.readouterr().err


def test_a_process_that_merely_imported_ipykernel_is_not_a_notebook(monkeypatch):
  import types

  from fedjax_tl import metrics

  monkeypatch.setattr(sys, "stderr", io.StringIO())
  monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # imported by some library
  assert metrics.progress_bar(3) is None
  fake_ipython = types.ModuleType("IPython")
  fake_ipython.get_ipython = lambda: type("ZMQInteractiveShell", (), {})()  # a Jupyter kernel
  monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
  bar = metrics.progress_bar(3)
  assert bar is not None
  bar.close()


MAINS = {"digits": (digits.main, []), "cifar10": (cifar10.main, ["--preset=smoke"]),
         "plan": (plan_cli.main, ["--preset=smoke", "--target=host"]),
         "diabetes": (diabetes.main, ["--preset=smoke"]), "text": (text.main, ["--preset=smoke"])}
CONFIGS = {"digits": digits, "cifar10": cifar10, "plan": cifar10, "diabetes": diabetes, "text": text}  # Config, PRESETS
CASES = [(r, e, bad) for r in rules.RULES for e in r.experiments for bad in r.bad]


def test_every_rule_has_a_breaking_example():
  untested = [r.name for r in rules.RULES if not r.bad]
  # these two are broken only by a missing package; the tests below block its import
  assert sorted(untested) == ["_tfds_installed", "privacy_installed", "quantization_installed"]
  assert len(CASES) > 100


@pytest.mark.parametrize("rule,experiment,bad", CASES, ids=[f"{e}:{r.name}:{' '.join(b)}" for r, e, b in CASES])
def test_the_flag_table_each_rule_is_a_one_line_usage_error_before_any_work(no_work, capsys, rule, experiment, bad):
  main, base = MAINS[experiment]
  argv = base + list(bad)
  # the example breaks this very rule (not only some other one)
  config_cls, presets = CONFIGS[experiment].Config, CONFIGS[experiment].PRESETS
  cfg, _ = common.parse_config(config_cls, presets, [a for a in argv if not a.startswith("--target=")])
  with pytest.raises(common.ConfigError):
    rule.check(cfg)
  with pytest.raises(SystemExit) as e:  # and the loaders (stubbed to raise _WorkStarted) were never reached
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and ": error: " in err, err
  assert any(f"--{flag}" in err for flag in rule.flags), err
  assert "Traceback" not in err


def test_every_flag_is_checked_by_a_rule():
  """Each config field is read by a rule of the table, or takes any value of its type."""
  free = {"quiet", "resume", "workdir", "data_dir", "mock_data", "augment", "personal_eval", "secure_agg", "dataset",
          "dp_adaptive", "trainable"}
  named = {f for r in rules.RULES for f in r.flags}
  for cls in (digits.Config, cifar10.Config, diabetes.Config, text.Config):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - named - free == set(), cls


def test_missing_qwix_is_a_usage_error_naming_the_install(no_work, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "qwix", None)  # import fails as if not installed
  with pytest.raises(SystemExit) as e:
    digits.main(["--quantize=int8"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and 'pip install -e ".[compress]"' in err and "--quantize" in err


def test_missing_jax_privacy_is_a_usage_error_naming_the_install(no_work, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "jax_privacy", None)
  for argv in (["--dp_clip=0.5", "--dp_epsilon=8", "--dp_mechanism=ftrl"], ["--dp_clip=0.5", "--dp_audit=50"]):
    with pytest.raises(SystemExit) as e:
      digits.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'pip install -e ".[privacy]"' in err, err


def test_plan_help_lists_the_planners_own_flags(capsys):
  with pytest.raises(SystemExit) as e:
    plan_cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--target", "--cohorts", "--examples_per_client", "--memory_gib", "--max_compiles", "--out",
               "--model", "--image_size"):
    assert flag in out, flag


def test_plan_flags_are_usage_errors(no_work, capsys):
  for argv, message in ((["--target=v9"], "--target"), (["--cohorts=10,x"], "--cohorts"),
                        (["--hbm_fraction=2"], "--hbm_fraction"), (["--examples_per_client=0"], "examples_per_client")):
    with pytest.raises(SystemExit) as e:
      plan_cli.main(["--preset=smoke", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
