"""What a work directory holds, and the rules that keep one run's results from being overwritten by another.

A run that writes into ``--workdir=DIR`` first *claims* it: ``DIR/fedjax_tl_run.json`` records what made the run
(the experiment, its whole config, the fedjax_tl version, the command and this process's run id). Every later
write (metrics rows, checkpoints, ``results.json``) is checked against that record, so a second process that
takes the directory over is noticed instead of interleaving its files with this run's.

Before anything is loaded, :func:`inspect` decides what a command may do with ``DIR``:

* empty or new: a fresh run (``--resume=true`` says there is nothing to resume and starts at round 0);
* another experiment's run, or the same experiment with other settings (anything but ``rounds``, ``workdir``,
  ``resume`` and the checkpoint/progress options): refused, with or without ``--resume``; the message names the
  directory, what is in it and the differing flags;
* the same run without ``--resume``: refused (pass ``--resume=true`` to continue it, or choose a new directory);
* the same run with ``--resume=true``: it continues from the newest checkpoint (rows recorded after that
  checkpoint are computed again, bit-identically); if it already holds the requested rounds and its
  ``results.json``, nothing is trained or written and the stored results are reported (:func:`finished`); a
  ``--rounds`` below what is already recorded, without a finished run to report, is refused (it would shorten
  the run's metrics).

Directories written before this record existed are recognised by the config stored with their checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence

from fedjax_tl.experiments.errors import ConfigError

__all__ = ["RECORD", "RUN_FILES", "RESUMABLE_FIELDS", "WorkdirError", "WorkdirStatus", "experiment_of", "inspect",
           "claim", "guard", "finished"]

RECORD = "fedjax_tl_run.json"
# What a run writes into its (per-run) directory besides checkpoints/ and tb/.
RUN_FILES = ("metrics.jsonl", "metrics.csv", "results.json")
# Config fields that may differ between the run that wrote a directory and the command that continues it.
RESUMABLE_FIELDS = ("rounds", "workdir", "resume", "checkpoint_every", "keep_checkpoints", "quiet")

_CLAIMED: dict[str, str] = {}  # absolute workdir -> the run id this process wrote into its record


class WorkdirError(RuntimeError):
  """The work directory changed hands during the run (another process claimed it): nothing more is written."""


@dataclasses.dataclass(frozen=True)
class WorkdirStatus:
  """What :func:`inspect` found: ``action`` is "fresh", "resume" or "done"; ``recorded`` the rounds each run
  directory's metrics hold; ``checkpoint`` each one's newest checkpoint round (None: none); ``note`` a line for
  the log (or "")."""

  action: str
  recorded: dict
  checkpoint: dict
  note: str = ""


def experiment_of(cfg) -> str:
  """The experiment a config belongs to: its class's ``EXPERIMENT`` (``digits``, ``cifar10``), else the name of
  the module that defines the class."""
  name = getattr(type(cfg), "EXPERIMENT", None)
  if name:
    return name
  module = type(cfg).__module__
  if module == "__main__":  # a script: its file's name, as when another process imports it
    module = os.path.splitext(os.path.basename(getattr(sys.modules["__main__"], "__file__", "") or "__main__"))[0]
  return module.rsplit(".", 1)[-1]


def _version() -> str:
  try:
    from importlib.metadata import version

    return version("fedjax_tl")
  except Exception:  # not installed (a source checkout on sys.path)
    return "unknown"


def _config_dict(cfg) -> dict:
  return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _record_path(workdir: str) -> str:
  return os.path.join(workdir, RECORD)


def read_record(workdir: str) -> dict | None:
  """The record of ``workdir`` (None if there is none); an unreadable one is a ConfigError naming it."""
  path = _record_path(workdir)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); it says which run wrote {workdir}. Choose a "
                      "new --workdir (or restore that file).") from None
  if not (isinstance(record, dict) and isinstance(record.get("config"), dict) and "experiment" in record):
    raise ConfigError(f"{path} is not a fedjax_tl run record (no experiment/config). Choose a new --workdir.")
  return record


def _rounds_in_metrics(d: str) -> int:
  from fedjax_tl.metrics import MetricsFileError, read_metrics

  path = os.path.join(d, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  try:
    rows = read_metrics(path)
  except MetricsFileError as e:
    raise ConfigError(str(e)) from None
  return max((r["round"] for r in rows), default=0)


def _checkpoint_rounds(d: str) -> list[int]:
  ckpt = os.path.join(d, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def _checkpoint_config(d: str) -> dict | None:
  """The config stored with the newest readable checkpoint of ``d`` (directories older than the record)."""
  for step in reversed(_checkpoint_rounds(d)):
    try:
      with open(os.path.join(d, "checkpoints", str(step), "config", "metadata")) as f:
        config = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(config, dict):
      return config
  return None


def _span(n: int) -> str:
  return "no rounds" if n == 0 else "round 1" if n == 1 else f"rounds 1-{n}"


def _contents(workdir: str, run_dirs: Sequence[str]) -> tuple[dict, dict, list[str]]:
  """Per run directory: rounds in its metrics, newest checkpoint; and a description of each one's files."""
  recorded, checkpoint, parts = {}, {}, []
  for sub in run_dirs:
    d = os.path.join(workdir, sub)
    if not os.path.isdir(d):
      recorded[sub], checkpoint[sub] = 0, None
      continue
    rounds, steps = _rounds_in_metrics(d), _checkpoint_rounds(d)
    recorded[sub], checkpoint[sub] = rounds, (steps[-1] if steps else None)
    files = [n for n in RUN_FILES if os.path.exists(os.path.join(d, n))]
    if not files and not steps:
      continue
    what = []
    if rounds:
      what.append(f"metrics of {_span(rounds)}")
    if steps:
      what.append(f"checkpoint of round {steps[-1]}")
    if "results.json" in files:
      what.append("results.json")
    what += [f for f in files if f not in ("metrics.jsonl", "results.json") and not rounds]
    label = "" if sub in ("", ".") else f"{sub}: "
    parts.append(f"{label}{', '.join(what) or ', '.join(files)}")
  if "" not in run_dirs and "." not in run_dirs and os.path.exists(os.path.join(workdir, "results.json")):
    parts.append("results.json")
  return recorded, checkpoint, parts


def _describe(record: dict | None, parts: list[str]) -> str:
  if record is None:
    return "files of an earlier run (" + "; ".join(parts) + ")"
  cfg = record["config"]
  head = f"a {record['experiment']} run"
  if "model" in cfg:
    head += f" (model {cfg['model']}"
    head += f", --rounds={cfg['rounds']})" if "rounds" in cfg else ")"
  elif "rounds" in cfg:
    head += f" (--rounds={cfg['rounds']})"
  return head + (": " + "; ".join(parts) if parts else ", no results yet")


def _diffs(saved: dict, now: dict) -> list[str]:
  keys = sorted(set(saved) | set(now))
  return [f"--{k}: {_show(saved.get(k, '(absent)'))} there, {_show(now.get(k, '(absent)'))} now" for k in keys
          if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k)]


def _show(v) -> str:
  return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def inspect(cfg, run_dirs: Sequence[str] = ("",), own: bool = False) -> WorkdirStatus:
  """What this command may do with ``cfg.workdir`` (see the module docstring); raises :class:`ConfigError` with
  a message naming the directory and what is in it when it may do nothing. ``run_dirs``: the per-run
  directories under the workdir (the digits demo has one per initialisation). Reads files only; writes
  nothing. ``own``: a record this process claimed for the same run counts as this run's (the second of several
  runs under one workdir, :func:`fedjax_tl.experiments.common.run_in_workdir`): only ``run_dirs`` are checked."""
  workdir, resume, experiment = cfg.workdir, cfg.resume, experiment_of(cfg)
  if not workdir:
    if resume:
      raise ConfigError("--resume=true needs the --workdir of the run to continue.")
    return WorkdirStatus("fresh", {}, {})
  if os.path.isfile(workdir):
    raise ConfigError(f"--workdir={workdir} is a file; give a directory.")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
    raise ConfigError(f"--workdir={workdir}: cannot write under {existing} (not a writable directory); choose "
                      "another.")
  record = read_record(workdir) if os.path.isdir(workdir) else None
  recorded, checkpoint, parts = _contents(workdir, run_dirs)
  now = _config_dict(cfg)
  if (own and record is not None and _CLAIMED.get(os.path.abspath(workdir)) == record.get("run_id")
      and record["experiment"] == experiment and not _diffs(record["config"], now)):
    # this process's own run (e.g. the digits demo's second initialisation): only its own directories count
    if not resume and parts:
      raise ConfigError(f"{workdir} already holds {'; '.join(parts)}: choose a new --workdir.")
    return WorkdirStatus("resume" if resume else "fresh", recorded, checkpoint)
  has_files = bool(parts) or os.path.exists(os.path.join(workdir, "results.json"))
  if record is None and not has_files:
    note = f"--resume=true but {workdir} holds no earlier run: starting this run from round 0." if resume else ""
    return WorkdirStatus("fresh", recorded, checkpoint, note)
  if record is None:  # written before run records existed: the checkpoints' config says what made it
    saved = next((c for c in (_checkpoint_config(os.path.join(workdir, s)) for s in run_dirs) if c), None)
    if saved is None or set(saved) != set(now):
      what = "another experiment's run" if saved is not None else "a run with no record of what made it"
      raise ConfigError(f"--workdir={workdir} holds {what} ({'; '.join(parts) or 'results.json'}); "
                        f"{experiment} would overwrite its results. Choose a new --workdir.")
    record = {"experiment": experiment, "config": saved}
  described = _describe(record, parts)
  if record["experiment"] != experiment:  # described as that run laid it out (its results at the top)
    described = _describe(record, _contents(workdir, ("",) + tuple(s for s in run_dirs if s not in ("", ".")))[2])
    raise ConfigError(f"--workdir={workdir} holds {described}; {experiment} would overwrite its results. Choose a "
                      "new --workdir.")
  diffs = _diffs(record["config"], now)
  if len(diffs) > 6:
    diffs = diffs[:6] + [f"and {len(diffs) - 6} more"]
  if diffs and (has_files or resume):
    raise ConfigError(f"--workdir={workdir} holds {described}, made with other settings ({'; '.join(diffs)}); "
                      + ("it cannot be continued with these. Resume with its settings, or c" if resume else "C")
                      + "hoose a new --workdir.")
  if not has_files:  # a record whose run never wrote anything (it stopped while loading): nothing to lose
    note = f"--resume=true but {workdir} holds no earlier run: starting this run from round 0." if resume else ""
    return WorkdirStatus("fresh", recorded, checkpoint, note)
  if not resume:
    raise ConfigError(f"--workdir={workdir} already holds {described}. Pass --resume=true to continue that run, or "
                      "choose a new --workdir.")
  complete = os.path.exists(os.path.join(workdir, "results.json"))
  if complete and all(recorded[s] >= cfg.rounds for s in run_dirs):
    top = max(recorded.values())
    return WorkdirStatus("done", recorded, checkpoint,
                         f"{workdir} already holds {_span(top)} of this run (--rounds={cfg.rounds} asks for no "
                         "more): nothing was trained or written; its results follow.")
  longer = {s: n for s, n in recorded.items() if n > cfg.rounds}
  if longer:
    where = ", ".join(f"{os.path.join(workdir, s)} {_span(n)}" for s, n in longer.items())
    raise ConfigError(f"--rounds={cfg.rounds} is fewer than {workdir} already holds ({where}); resuming would cut "
                      f"its metrics short. Resume with --rounds>={max(longer.values())}, or choose a new --workdir.")
  again = {s: (checkpoint[s] or 0, n) for s, n in recorded.items() if n > (checkpoint[s] or 0)}
  note = ""
  if again:
    note = "; ".join(f"{os.path.join(workdir, s)}: rounds {c + 1}-{n} were recorded after its newest checkpoint "
                     f"({'round ' + str(c) if c else 'none'}) and are run again" for s, (c, n) in again.items())
  return WorkdirStatus("resume", recorded, checkpoint, note)


def _write_record(workdir: str, record: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = _record_path(workdir) + f".tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, _record_path(workdir))


def claim(cfg) -> None:
  """Records that this process's run writes into ``cfg.workdir`` (call after :func:`inspect` allowed it, right
  before the first write). A record of the same run (being resumed) is taken over; any other is an error."""
  workdir = os.path.abspath(cfg.workdir)
  record = read_record(workdir)
  if record is not None and _CLAIMED.get(workdir) == record.get("run_id"):
    return
  now = _config_dict(cfg)
  if record is not None and (record["experiment"] != experiment_of(cfg) or _diffs(record["config"], now)):
    raise WorkdirError(f"{workdir} was claimed by another run while this one was starting ({_record_path(workdir)}: "
                       f"{record['experiment']}); nothing was written. Choose a new --workdir.")
  run_id = uuid.uuid4().hex
  history = (record or {}).get("sessions", [])
  _write_record(workdir, {
      "experiment": experiment_of(cfg), "fedjax_tl_version": _version(), "config": now, "run_id": run_id,
      "sessions": history + [{"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "resume": bool(getattr(cfg, "resume", False)), "rounds": getattr(cfg, "rounds", None),
                              "command": " ".join(sys.argv)}]})
  _CLAIMED[workdir] = run_id


def guard(cfg) -> None:
  """Before a write: ``cfg.workdir`` must still be this process's run (raises :class:`WorkdirError`)."""
  workdir = os.path.abspath(cfg.workdir)
  try:
    record = read_record(workdir)
  except ConfigError as e:
    raise WorkdirError(str(e)) from None
  if record is None or record.get("run_id") != _CLAIMED.get(workdir):
    who = "its record was removed" if record is None else f"another {record['experiment']} run claimed it"
    raise WorkdirError(f"{workdir} is no longer this run's ({who}); stopped before writing into it. Choose a new "
                       "--workdir for one of the two runs.")


def finished(cfg, status: WorkdirStatus, log=print) -> dict | None:
  """For a "done" status: logs what the directory holds and returns the stored summary of ``results.json``
  (with ``already_done`` and the rounds it holds); None otherwise. Writes nothing."""
  if status.action != "done":
    return None
  with open(os.path.join(cfg.workdir, "results.json")) as f:
    results = json.load(f)
  log(status.note)
  summary = dict(results.get("summary", {}))
  rounds = max(status.recorded.values())
  final = summary.get("final_test_accuracy")
  if isinstance(final, dict):
    log(f"final test accuracy at round {rounds}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
  elif isinstance(final, (int, float)):
    log(f"final test accuracy at round {rounds}: {final:.4f}")
  log(f"(stored in {os.path.join(cfg.workdir, 'results.json')}; continue the run with a larger --rounds)")
  summary.update(already_done=True, rounds_done=rounds)
  return summary
