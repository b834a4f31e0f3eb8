"""Work directories: a command never overwrites, shortens or truncates another run's files (byte for byte), a
run that already holds the requested rounds says so and writes nothing, and a directory claimed by another
process mid-run stops this one's writes (fedjax_tl/experiments/workdir.py)."""

import dataclasses
import json
import os

import pytest
from conftest import WorkStarted as _WorkStarted

from fedjax_tl.experiments import cifar10, common, digits, workdir


def _snapshot(root) -> dict:
  """Every file under ``root`` with its bytes."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def cifar10_workdir(tmp_path_factory, tiny_local, tiny_data, tiny_params):
  """A CIFAR-10 run's work directory, as the experiment writes it (record, metrics, checkpoint, results.json),
  made by the same code path with the tiny model instead of a ResNet (seconds instead of a minute)."""
  from fedjax_tl.core.fedavg import FedAvg

  d = str(tmp_path_factory.mktemp("cifar10_run"))
  cfg = dataclasses.replace(cifar10.PRESETS["smoke"], workdir=d, rounds=2)
  algo = FedAvg(tiny_local, schedule="sequential/host:1")
  _, hist = common.run_in_workdir(cfg, algo, algo.init(*tiny_params), tiny_data, rounds=2, cohort_size=2,
                                  evaluate_fn=None, workdir=d, log=lambda *_: None)
  common.write_results(d, cfg, hist, {"final_test_accuracy": 0.5}, log=lambda *_: None)
  return d


def test_another_experiment_never_writes_into_a_run_even_with_resume(cifar10_workdir, no_work, capsys):
  before = _snapshot(cifar10_workdir)
  assert {"fedjax_tl_run.json", "metrics.jsonl", "results.json"} <= set(before)
  for extra in ([], ["--resume=true"]):  # the second is what the old refusal advised, and it overwrote results.json
    with pytest.raises(SystemExit) as e:
      digits.main([f"--workdir={cifar10_workdir}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--workdir={cifar10_workdir} holds a cifar10 run" in err and "Choose a new --workdir" in err
    assert "metrics of rounds 1-2" in err and "results.json" in err
    assert "--resume=true" not in err  # no advice to resume what cannot be resumed
  assert _snapshot(cifar10_workdir) == before


def test_the_same_experiment_with_other_settings_is_refused_naming_the_flags(cifar10_workdir, no_work, capsys):
  before = _snapshot(cifar10_workdir)
  with pytest.raises(SystemExit) as e:
    cifar10.main(["--preset=smoke", f"--workdir={cifar10_workdir}", "--resume=true", "--client_lr=0.5"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "made with other settings (--client_lr: 0.001 there, 0.5 now)" in err and "cannot be continued" in err
  with pytest.raises(SystemExit):
    cifar10.main(["--preset=smoke", f"--workdir={cifar10_workdir}"])
  assert "Pass --resume=true to continue that run" in capsys.readouterr().err
  # the same settings with --resume=true pass the checks (and go on to load the data)
  with pytest.raises(_WorkStarted):
    cifar10.main(["--preset=smoke", f"--workdir={cifar10_workdir}", "--resume=true", "--rounds=3"])
  assert _snapshot(cifar10_workdir) == before


def test_a_directory_without_a_record_is_not_resumed_blindly(tmp_path, no_work, capsys):
  # metrics and results of unknown origin (written by hand, or by a version without records): never overwritten
  (tmp_path / "pretrained").mkdir()
  (tmp_path / "pretrained" / "metrics.jsonl").write_text('{"round": 1}\n')
  (tmp_path / "results.json").write_text("{}")
  before = _snapshot(tmp_path)
  for extra in ([], ["--resume=true"]):
    with pytest.raises(SystemExit) as e:
      digits.main([f"--workdir={tmp_path}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds a run with no record of what made it (pretrained: metrics of round 1; results.json)" in err
  assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """The digits smoke run to round 4 in a work directory, and its summary."""
  d = str(tmp_path_factory.mktemp("digits_run"))
  cfg = dataclasses.replace(digits.PRESETS["smoke"], rounds=4, workdir=d, quiet=True)
  summary = digits.run(cfg, log=lambda *_: None)
  return d, cfg, summary


def test_resume_past_the_requested_rounds_reports_the_run_and_writes_nothing(digits_run):
  d, cfg, summary = digits_run
  before = _snapshot(d)
  lines = []
  out = digits.run(dataclasses.replace(cfg, resume=True, rounds=2), log=lines.append)
  text = "\n".join(lines)
  # the 4-round run is reported as what it is, not as a 2-round run
  assert "already holds rounds 1-4 of this run (--rounds=2 asks for no more): nothing was trained or written" in text
  assert f"pretrained {summary['final_test_accuracy']['pretrained']:.4f}" in text and "at round 4" in text
  assert out["already_done"] and out["rounds_done"] == 4
  assert out["final_test_accuracy"] == summary["final_test_accuracy"]
  assert _snapshot(d) == before


def test_resume_without_checkpoints_never_shortens_the_metrics(digits_run, tmp_path, capsys, no_work):
  import shutil

  src, cfg, _ = digits_run
  d = str(tmp_path / "copy")
  shutil.copytree(src, d)
  for arm in digits.RUN_DIRS:  # checkpoints deleted; metrics.jsonl still holds 4 rounds
    shutil.rmtree(os.path.join(d, arm, "checkpoints"))
  before = _snapshot(d)
  # with the run's results.json: reported, nothing written (this used to rewrite metrics.jsonl to 1 row)
  lines = []
  digits.run(dataclasses.replace(cfg, workdir=d, resume=True, rounds=1), log=lines.append)
  assert "already holds rounds 1-4" in lines[0]
  assert _snapshot(d) == before
  # without results.json (killed before the end): --rounds=1 would cut the metrics short, so it is refused
  os.remove(os.path.join(d, "results.json"))
  before = _snapshot(d)
  with pytest.raises(SystemExit) as e:
    digits.main([f"--workdir={d}", "--preset=smoke", "--rounds=1", "--resume=true"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f"--rounds=1 is fewer than {d} already holds ({os.path.join(d, 'pretrained')} rounds 1-4" in err
  assert "Resume with --rounds>=4" in err
  assert _snapshot(d) == before


def test_a_directory_taken_over_mid_run_stops_the_writes(tmp_path, tiny_local, tiny_data, tiny_params):
  from fedjax_tl.core.fedavg import FedAvg

  d = str(tmp_path)
  cfg = dataclasses.replace(digits.PRESETS["smoke"], workdir=d, rounds=3, quiet=True)
  algo = FedAvg(tiny_local, schedule="sequential/host:1")

  def intruder(rec, _):  # another process claims the directory after round 1
    if rec["round"] == 1:
      record = json.loads((tmp_path / workdir.RECORD).read_text())
      (tmp_path / workdir.RECORD).write_text(json.dumps({**record, "run_id": "someone-else"}))

  with pytest.raises(workdir.WorkdirError, match="no longer this run's"):
    common.run_in_workdir(cfg, algo, algo.init(*tiny_params), tiny_data, rounds=3, cohort_size=2, evaluate_fn=None,
                          workdir=d, log=lambda *_: None, on_round=intruder)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1]
  with pytest.raises(workdir.WorkdirError):
    common.write_results(d, cfg, [], {}, log=lambda *_: None)
  assert not (tmp_path / "results.json").exists()


def test_the_record_says_what_made_the_run(cifar10_workdir):
  record = json.loads(open(os.path.join(cifar10_workdir, workdir.RECORD)).read())
  assert record["experiment"] == "cifar10" and record["config"]["model"] == "tiny"
  assert record["config"]["rounds"] == 2 and record["fedjax_tl_version"]
  assert len(record["sessions"]) == 1 and record["sessions"][0]["run_id"] == record["run_id"]


@pytest.mark.parametrize("mechanism", ["fedavg", "ftrl"])
def test_dp_flags_build_the_audited_run_and_its_privacy_statement(tmp_path, tiny_local, tiny_data, tiny_params,
                                                                   mechanism):
  """--dp_mechanism / --dp_audit through the experiments' own set-up (privacy_setup, run_in_workdir): the canaries
  join the population, the last round's record has epsilon_audit, the statement names the mechanism's schema."""
  pytest.importorskip("jax_privacy")
  cfg = dataclasses.replace(digits.PRESETS["smoke"], num_clients=tiny_data.num_clients, clients_per_round=6,
                            rounds=2, dp_clip=0.5, dp_epsilon=8.0, dp_mechanism=mechanism, dp_audit=10,
                            workdir=str(tmp_path), quiet=True)
  digits.validate(cfg)
  privacy = common.privacy_setup(cfg, tiny_data.num_clients, log=lambda *_: None)
  assert privacy.population == tiny_data.num_clients + 10
  kwargs, eps = common.transform_setup(cfg, tiny_data.num_clients, log=lambda *_: None, privacy=privacy)
  from fedjax_tl.core.fedavg import FedAvg

  algo = FedAvg(tiny_local, schedule="sequential/host:1", **common.fedavg_kwargs(kwargs))
  algo, data = privacy.attach(algo, tiny_data)
  assert data.num_clients == 15
  _, hist = common.run_in_workdir(cfg, algo, algo.init(*tiny_params), data, rounds=2, cohort_size=6,
                                  evaluate_fn=None, workdir=str(tmp_path), log=lambda *_: None,
                                  round_metrics=eps, sampler=privacy.sampler,
                                  state_metrics=privacy.state_metrics(2, cfg.dp_delta))
  assert "epsilon_audit" not in hist[0] and hist[1]["audit_canaries"] == 10
  assert 0 <= hist[1]["epsilon_audit"] <= hist[1]["epsilon_audit_max"]
  assert hist[1]["epsilon"] == pytest.approx(8.0, rel=1e-3)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[1]["epsilon_audit"] == hist[1]["epsilon_audit"]
  audit = {k: v for k, v in hist[-1].items() if k.startswith(("epsilon_audit", "audit_"))}
  st = privacy.statement(algo, 2, cfg.dp_delta, False, audit)
  assert st["epsilon"] == pytest.approx(8.0, rel=1e-3) and st["population"] == 15
  assert st["epsilon_audit"] == hist[1]["epsilon_audit"]
  if mechanism == "ftrl":
    assert "participation schema" in st["sampling"] and privacy.sampler is not None
    for ids in (r["client_ids"] for r in hist):
      assert len(ids) == 6
  else:
    assert "fixed-size cohorts" in st["sampling"] and privacy.sampler is None
