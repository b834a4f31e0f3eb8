"""Config handling shared by the experiment entry points: dataclass configs, presets, ``--field=value``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence

__all__ = ["parse_config", "write_results", "format_table", "run_in_workdir"]


def _parse_bool(v: str) -> bool:
  if v.lower() in ("1", "true", "yes", "on"):
    return True
  if v.lower() in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _field_type(tp):
  """argparse type for a dataclass field annotation (int, float, str, bool, or X | None). Only for optional
  fields (X | None) does the text 'none' mean None; for a plain str field it is the string 'none'."""
  args = typing.get_args(tp)
  optional = type(None) in args
  inner = next((a for a in args if a is not type(None)), tp) if args else tp
  base = _parse_bool if inner is bool else inner if inner in (int, float, str) else str
  if not optional:
    return base
  return lambda v: None if v.lower() == "none" else base(v)


def parse_config(config_cls, presets: dict, argv: Sequence[str] | None = None, description: str = ""):
  """Builds ``config_cls`` from ``--preset NAME`` plus ``--field=value`` overrides for any of its fields."""
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                      help="named configuration to start from")
  hints = typing.get_type_hints(config_cls)
  for f in dataclasses.fields(config_cls):
    parser.add_argument(f"--{f.name}", type=_field_type(hints[f.name]), default=None,
                        help="override (preset value used when omitted)")
  given = {a.split("=")[0][2:].replace("-", "_") for a in (argv or []) if a.startswith("--")}
  args = parser.parse_args(argv)
  base = presets[args.preset]
  # A field given on the command line overrides the preset even when its value is None (--trainable=none).
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
               if f.name in given or getattr(args, f.name) is not None}
  return dataclasses.replace(base, **overrides), args.preset


def write_results(workdir: str | None, config, history: dict, summary: dict) -> str | None:
  """Writes config, per-round history and the final summary as JSON under ``workdir``; returns the path."""
  if not workdir:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")
  with open(path, "w") as f:
    json.dump({"config": dataclasses.asdict(config), "history": history, "summary": summary}, f, indent=1)
  return path


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  cells = [[h for h in header]] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def run_in_workdir(cfg, algorithm, state, data, *, rounds: int, cohort_size: int, evaluate_fn, workdir: str | None,
                   log=print, on_round=None):
  """``run_rounds`` to a total of ``rounds``, with metrics files and checkpoints when ``workdir`` is set.

  ``cfg`` must have ``seed``, ``resume``, ``checkpoint_every``, ``keep_checkpoints`` and ``quiet``. With
  ``resume`` the latest checkpoint in ``workdir`` is restored (its config must match) and the run continues
  to ``rounds``; without it, a workdir that already holds checkpoints is an error (nothing is overwritten).
  Returns (final state, all rounds' records, including those before the resume).
  """
  from fedjax_tl.checkpoint import Checkpointer
  from fedjax_tl.core.train import run_rounds
  from fedjax_tl.metrics import MetricsWriter

  if not workdir:
    return run_rounds(algorithm, state, data, rounds=rounds, cohort_size=cohort_size, seed=cfg.seed,
                      evaluate_fn=evaluate_fn, on_round=on_round)
  ckpt = Checkpointer(workdir, cfg, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
  latest = ckpt.latest_round()
  if latest is not None and not cfg.resume:
    raise FileExistsError(f"{workdir} already holds checkpoints (latest round {latest}); pass --resume=true to "
                          "continue that run, or choose a new --workdir.")
  if latest is not None:
    state = ckpt.restore(state)
    log(f"resumed from the checkpoint of round {int(state.round)} in {ckpt.directory}")
  writer = MetricsWriter(workdir, rounds, resume_round=int(state.round), quiet=cfg.quiet)

  def save(rec, s):
    writer.write(rec)
    ckpt.maybe_save(s, final=rec["round"] == rounds)
    if on_round is not None:
      on_round(rec, s)

  try:
    state, _ = run_rounds(algorithm, state, data, rounds=max(rounds - int(state.round), 0),
                          cohort_size=cohort_size, seed=cfg.seed, evaluate_fn=evaluate_fn, on_round=save)
  finally:
    writer.close()
    ckpt.close()
  return state, writer.rows
