"""Config handling shared by the experiment entry points: dataclass configs, presets, ``--field=value``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence

import jax.numpy as jnp

from fedjax_tl.experiments import rules
from fedjax_tl.experiments import workdir as wd
from fedjax_tl.experiments.errors import ConfigError
from fedjax_tl.experiments.rules import check, parse_ints  # noqa: F401 (re-exported for the entry points)
from fedjax_tl.metrics import format_table  # noqa: F401 (re-exported for the entry points)

__all__ = ["DTYPES", "ConfigError", "parse_config", "validate", "cli_main", "write_results", "format_table",
           "run_in_workdir", "TransformFlags", "transform_setup", "fedavg_kwargs", "check", "parse_ints"]


@dataclasses.dataclass(frozen=True)
class TransformFlags:
  """Update-transform fields shared by the experiments' configs (read by :func:`transform_setup`)."""

  # compression: none | int8 | qsgd:B | topk:F | randk:F | sign (biased ones with error feedback; '/noef' off)
  compress: str = "none"
  downlink: str = "none"  # compressor of the broadcast model: none | int8 | qsgd:B
  # DP-FedAvg (off by default): --dp_clip=C with --dp_noise_multiplier=Z, or --dp_epsilon=E (calibrated)
  dp_clip: float = 0.0
  dp_noise_multiplier: float = 0.0
  dp_epsilon: float = 0.0
  dp_delta: float = 1e-5
  dp_accountant: str = "rdp"
  dp_adaptive: bool = False  # adaptive clipping (Andrew et al. 2021) from dp_clip towards dp_target_quantile
  dp_target_quantile: float = 0.5
  dp_count_stddev: float = 0.0  # noise std on the count of clients within the clip; 0 = clients_per_round / 20
  secure_agg: bool = False  # simulated secure aggregation (Bonawitz et al. 2017); BN statistics not averaged
  secagg_clip: float = 1.0  # bound on every coordinate of a weighted update under secure aggregation
  secagg_dropout: float = 0.0  # probability that a client drops out after masking


# --dtype values: the models' computation dtype (None = float32; bfloat16 = mixed precision, params float32)
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


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

  def parse(v):
    return None if v.lower() == "none" else base(v)

  parse.__name__ = getattr(base, "__name__", "value")  # argparse names the type in "invalid int value"
  return parse


def _show(v) -> str:
  return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


class OneLineParser(argparse.ArgumentParser):
  """An argparse parser whose usage errors are one line, ``PROG: error: MESSAGE`` (exit code 2): the message
  names the flag and the fix; ``--help`` lists the flags."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(config_cls, presets: dict, preset: str, description: str = "") -> argparse.ArgumentParser:
  """The parser of ``--preset`` and every config field, with the values of ``preset`` as defaults (shown by
  ``--help``, together with the other presets' values where they differ). No prefix abbreviations:
  ``--round=1`` is an error, not ``--rounds=1``."""
  parser = OneLineParser(description=description, allow_abbrev=False,
                         epilog=f"The defaults shown are those of preset {preset}; --preset=NAME --help shows "
                         "another preset's.")
  parser.add_argument("--preset", default=preset, choices=list(presets),
                      help=f"named configuration to start from (default: {next(iter(presets))})")
  base = presets[preset]
  hints = typing.get_type_hints(config_cls)
  for f in dataclasses.fields(config_cls):
    value = getattr(base, f.name)
    others = [f"{n}: {_show(getattr(p, f.name))}" for n, p in presets.items()
              if n != preset and getattr(p, f.name) != value]
    help_text = f"default: {_show(value)}" + (f" ({'; '.join(others)})" if others else "")
    parser.add_argument(f"--{f.name}", type=_field_type(hints[f.name]), default=value,
                        help=help_text.replace("%", "%%"))
  return parser


def parse_config(config_cls, presets: dict, argv: Sequence[str] | None = None, description: str = "",
                 validate=None, add_arguments=None):
  """Builds ``config_cls`` from ``--preset NAME`` plus ``--field=value`` overrides for any of its fields.

  ``validate(config)`` (optional) may raise :class:`ConfigError`; that and any unparsable value end the
  program with a one-line usage error (exit code 2). ``add_arguments(parser)`` (optional) adds an entry point's
  own flags (listed by ``--help`` too); they are then returned as a third value, an ``argparse.Namespace``.
  """
  argv = list(argv) if argv is not None else None
  pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  pre.add_argument("--preset", default=next(iter(presets)))
  known, _ = pre.parse_known_args(argv)
  preset = known.preset if known.preset in presets else next(iter(presets))  # unknown: the full parser says so
  parser = make_parser(config_cls, presets, preset, description)
  own = add_arguments(parser.add_argument_group("this entry point's own flags")) if add_arguments else None
  args = parser.parse_args(argv)
  fields = {f.name for f in dataclasses.fields(config_cls)}
  cfg = dataclasses.replace(presets[args.preset], **{name: getattr(args, name) for name in fields})
  if validate is not None:
    try:
      validate(cfg)
    except ConfigError as e:
      parser.error(str(e))
  if add_arguments is None:
    return cfg, args.preset
  del own
  extra = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in fields and k != "preset"})
  return cfg, args.preset, extra


def validate(cfg, experiment: str, run_dirs: Sequence[str] = ("",)) -> wd.WorkdirStatus:
  """Every rule of the flag table (:mod:`fedjax_tl.experiments.rules`) for ``experiment``, then the work
  directory's (:func:`fedjax_tl.experiments.workdir.inspect`); raises :class:`ConfigError` naming the flag, or the
  directory and what it holds. Returns what the work directory allows (fresh, resume or done)."""
  rules.validate(cfg, experiment)
  return wd.inspect(cfg, run_dirs)


def cli_main(run, config_cls, presets: dict, argv, description: str, validate) -> None:
  """An entry point: parse and validate the flags (usage error, exit 2), then ``run(config)``; an error the user
  can fix (bad checkpoint or weights, missing data or package, existing run) ends with its message and exit 1,
  without a traceback."""
  import sys

  from fedjax_tl.checkpoint import CheckpointError
  from fedjax_tl.metrics import MetricsFileError
  from fedjax_tl.models.pretrained import WeightMismatchError
  from fedjax_tl.models.weights import WeightFileError

  cfg, _ = parse_config(config_cls, presets, argv, description=description, validate=validate)
  try:
    run(cfg)
  except (ConfigError, CheckpointError, WeightFileError, WeightMismatchError, MetricsFileError,
          wd.WorkdirError, FileExistsError, FileNotFoundError, FloatingPointError) as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)  # argparse's prog, as for usage errors
    raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None


def write_results(workdir: str | None, config, history, summary: dict, log=print) -> str | None:
  """Writes config, per-round history and the final summary as JSON under ``workdir`` (and says where); when
  that is ``config.workdir``, only while the directory is still this run's (its record)."""
  if not workdir:
    return None
  if getattr(config, "workdir", None) and os.path.abspath(config.workdir) == os.path.abspath(workdir):
    wd.guard(config)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": dataclasses.asdict(config), "history": history, "summary": summary}, f, indent=1)
  os.replace(tmp, path)  # a run killed while writing keeps the previous results.json whole
  log(f"results written to {path}")
  return path


def run_in_workdir(cfg, algorithm, state, data, *, rounds: int, cohort_size: int, evaluate_fn, workdir: str | None,
                   log=print, on_round=None, round_metrics=None):
  """``run_rounds`` to a total of ``rounds``, with metrics files and checkpoints when ``workdir`` is set.

  ``cfg`` must have ``seed``, ``resume``, ``checkpoint_every``, ``keep_checkpoints`` and ``quiet`` (True: no
  progress bar; None: one when stderr is a terminal); ``workdir`` is ``cfg.workdir`` or a directory under it
  (one run of several, as the digits demo's initialisations). The work directory rules of
  :mod:`fedjax_tl.experiments.workdir` apply: the directory is claimed for this run (its record), another run's
  files are never overwritten, and every round's write checks the claim. With ``resume`` the latest intact
  checkpoint in ``workdir`` is restored (its config must match; a damaged newer one is moved aside with a
  warning) and the run continues to ``rounds`` (with a warning, from round 0 if there is none); a run that
  already holds ``rounds`` rounds and its results is returned as it is, with nothing written.
  Returns (final state, all rounds' records, including those before the resume).
  """
  from fedjax_tl.checkpoint import Checkpointer
  from fedjax_tl.core.train import run_rounds
  from fedjax_tl.metrics import MetricsWriter, progress_bar, read_metrics, update_bar

  if not workdir:
    bar = progress_bar(rounds, int(state.round), cfg.quiet)

    def show(rec, s):
      update_bar(bar, rec)
      if on_round is not None:
        on_round(rec, s)

    try:
      return run_rounds(algorithm, state, data, rounds=rounds, cohort_size=cohort_size, seed=cfg.seed,
                        evaluate_fn=evaluate_fn, on_round=show, round_metrics=round_metrics)
    finally:
      if bar is not None:
        bar.close()
  top = cfg.workdir if getattr(cfg, "workdir", None) else workdir
  sub = os.path.relpath(os.path.abspath(workdir), os.path.abspath(top))
  if sub.startswith(".."):  # not under cfg.workdir: the directory is its own run's
    top, sub = workdir, "."
  rcfg = dataclasses.replace(cfg, workdir=top, rounds=rounds)
  status = wd.inspect(rcfg, (sub,), own=True)
  if status.action == "done":  # nothing to train, nothing to write
    ckpt = Checkpointer(workdir, cfg, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    try:
      if ckpt.latest_round() is not None:
        state = ckpt.restore(state, log=log)
    finally:
      ckpt.close()
    log(status.note)
    return state, read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if status.note and status.action == "resume":
    log(f"note: {status.note}")
  wd.claim(rcfg)
  ckpt = Checkpointer(workdir, cfg, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
  try:
    if cfg.resume and ckpt.latest_round() is None:
      log(f"warning: --resume=true but {ckpt.directory} holds no checkpoint: starting this run from round 0.")
    elif cfg.resume:
      state = ckpt.restore(state, log=log)
      log(f"resumed from the checkpoint of round {int(state.round)} in {ckpt.directory}")
    if int(state.round) > rounds:
      raise ConfigError(f"{ckpt.directory} holds round {int(state.round)}, past --rounds={rounds}: resume with "
                        f"--rounds>={int(state.round)}, or choose a new --workdir.")
    writer = MetricsWriter(workdir, rounds, resume_round=int(state.round), quiet=cfg.quiet)
  except BaseException:
    ckpt.close()
    raise

  def save(rec, s):
    wd.guard(rcfg)
    writer.write(rec)
    ckpt.maybe_save(s, final=rec["round"] == rounds)
    if on_round is not None:
      on_round(rec, s)

  done = [r for r in writer.rows if r["round"] <= int(state.round)]
  so_far = (sum(r["bytes_up"] for r in done), sum(r["bytes_down"] for r in done))
  try:
    state, _ = run_rounds(algorithm, state, data, rounds=max(rounds - int(state.round), 0),
                          cohort_size=cohort_size, seed=cfg.seed, evaluate_fn=evaluate_fn, on_round=save,
                          round_metrics=round_metrics, bytes_so_far=so_far)
  finally:
    writer.close()
    ckpt.close()
  return state, writer.rows


def dp_setup(cfg, population: int, log=print):
  """DP-FedAvg pieces from a config with dp_clip, dp_noise_multiplier, dp_epsilon, dp_delta, dp_accountant,
  clients_per_round and rounds: returns (FedAvg keyword arguments, round_metrics function or None).

  ``dp_epsilon > 0`` calibrates the noise multiplier so that the planned rounds spend exactly that epsilon;
  ``dp_clip > 0`` alone uses ``dp_noise_multiplier``. ``dp_adaptive`` makes dp_clip
  the initial clip norm of adaptive clipping towards ``dp_target_quantile`` (count noise ``dp_count_stddev``,
  0 = cohort / 20); the accountant sees the same overall noise multiplier. Accounting assumes the fixed-size
  cohort sampling that ``sample_clients`` does (replace-one neighbouring clients, sensitivity 2 * clip) with
  either accountant ("pld" is tighter, "rdp" faster); see ``fedjax_tl.privacy.accounting``.
  """
  from fedjax_tl.privacy import accounting
  from fedjax_tl.transforms import dp_fedavg

  if cfg.dp_epsilon <= 0 and cfg.dp_clip <= 0:
    return {}, None
  if cfg.dp_clip <= 0:
    raise ValueError("--dp_epsilon needs a clipping norm: set --dp_clip > 0.")
  sampling = "fixed"  # what sample_clients does
  m = cfg.clients_per_round
  z = cfg.dp_noise_multiplier
  if cfg.dp_epsilon > 0:
    z = rules.calibrated_noise_multiplier(cfg.dp_epsilon, population, m, cfg.rounds, cfg.dp_delta,
                                          cfg.dp_accountant)
  if z == 0:
    log("warning: --dp_clip without --dp_noise_multiplier or --dp_epsilon clips the updates but adds no noise: "
        "no privacy (epsilon is infinite).")
  log(f"DP-FedAvg: clip {cfg.dp_clip}, noise multiplier {z:.4f} (noise std on the mean {z * cfg.dp_clip / m:.4g}), "
      f"delta {cfg.dp_delta}, {cfg.dp_accountant} accountant, {sampling} sampling")
  eps = lambda r: {"epsilon": accounting.epsilon(z, population, m, r, cfg.dp_delta, cfg.dp_accountant, sampling),
                   "noise_multiplier": z}
  if cfg.dp_adaptive:
    from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping

    ac = AdaptiveClipping(z, m, initial_clip=cfg.dp_clip, target_quantile=cfg.dp_target_quantile,
                          count_stddev=cfg.dp_count_stddev or None)
    log(f"adaptive clipping: initial clip {cfg.dp_clip}, target quantile {cfg.dp_target_quantile}, count noise "
        f"std {ac.sigma_b:.4g}, delta noise multiplier {ac.delta_noise_multiplier:.4f}")
    return {"adaptive_clip": ac, "weighting": "uniform"}, eps
  client, server = dp_fedavg(cfg.dp_clip, z, m)
  return {"client_transform": client, "server_transform": server, "weighting": "uniform"}, eps


def transform_setup(cfg, population: int, log=print):
  """FedAvg keyword arguments for the update transforms a config asks for, and the round_metrics function.

  ``cfg`` has the :class:`TransformFlags` fields: the DP ones (see :func:`dp_setup`), ``compress`` (uplink
  compressor, e.g. "topk:0.01", "int8", "qsgd:4", "sign"; see ``transforms.compression.parse``), ``downlink``
  (compressor of the broadcast model, e.g. "int8") and ``secure_agg`` with ``secagg_clip`` / ``secagg_dropout``.
  DP clipping runs before compression (the noise is added on the server).
  """
  import jax.numpy as jnp

  from fedjax_tl.transforms import chain, compression
  from fedjax_tl.transforms.base import is_stateless
  from fedjax_tl.transforms.secure_agg import SecureAggregation

  kwargs, round_metrics = dp_setup(cfg, population, log)
  compressor = compression.parse(cfg.compress)
  if compressor is not None:
    clip = kwargs.get("client_transform")
    kwargs["client_transform"] = compressor if clip is None else chain(clip, compressor)
    log(f"uplink compression: {cfg.compress}")
  downlink = compression.parse(cfg.downlink)
  if downlink is not None:
    if not is_stateless(downlink, {"probe": jnp.zeros((4,))}):
      raise ValueError(f"--downlink={cfg.downlink} needs error feedback, which a broadcast cannot have; use "
                       "int8, qsgd:B or a '/noef' compressor.")
    kwargs["downlink"] = downlink
    log(f"downlink compression: {cfg.downlink}")
  if cfg.secure_agg:
    kwargs["secure_aggregation"] = SecureAggregation(clip_value=cfg.secagg_clip, dropout=cfg.secagg_dropout)
    log(f"secure aggregation: coordinate clip {cfg.secagg_clip}, dropout {cfg.secagg_dropout}")
  return kwargs, round_metrics



def fedavg_kwargs(kwargs: dict) -> dict:
  """FedAvg arguments from :func:`transform_setup`'s pieces: ``weighting``, ``secure_aggregation`` and
  ``adaptive_clip`` become the one aggregator (:mod:`fedjax_tl.aggregators`); the transforms pass through."""
  import dataclasses as dc

  from fedjax_tl import aggregators

  kw = dict(kwargs)
  weighting = kw.pop("weighting", "num_examples")
  secure, adaptive = kw.pop("secure_aggregation", None), kw.pop("adaptive_clip", None)
  if adaptive is not None and secure is not None:
    raise ValueError("Adaptive clipping under secure aggregation is not supported (the clip-count bits would be "
                     "sent in the clear).")
  if adaptive is not None:
    kw["aggregator"] = adaptive
  elif secure is not None:
    kw["aggregator"] = dc.replace(secure, weighting=weighting)
  elif weighting != "num_examples":
    kw["aggregator"] = aggregators.Mean(weighting)
  return kw
