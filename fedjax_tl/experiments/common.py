"""Config handling shared by the experiment entry points: dataclass configs, presets, ``--field=value``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
  # DP mechanism: fedavg (DP-FedAvg, uniformly sampled fixed-size cohorts) | ftrl (DP-FTRL: noise correlated
  # across rounds by a matrix factorization, clients in a participation schema instead of sampled; needs jax-privacy)
  dp_mechanism: str = "fedavg"
  dp_ftrl_strategy: str = "banded"  # banded (bands = --dp_min_sep) | blt | identity (independent noise)
  dp_min_sep: int = 0  # DP-FTRL: a client takes part at most once every this many rounds; 0 = clients / cohort
  dp_audit: int = 0  # canary clients for the one-run privacy audit (epsilon_audit, a lower bound); 0 = off
  dp_audit_confidence: float = 0.95  # confidence of the audit's lower bound
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
                   log=print, on_round=None, round_metrics=None, sampler=None, state_metrics=None):
  """``run_rounds`` to a total of ``rounds``, with metrics files and checkpoints when ``workdir`` is set.

  ``cfg`` must have ``seed``, ``resume``, ``checkpoint_every``, ``keep_checkpoints`` and ``quiet`` (True: no
  progress bar; None: one when stderr is a terminal); ``workdir`` is ``cfg.workdir`` or a directory under it
  (one run of several, as the digits demo's initialisations). The work directory rules of
  :mod:`fedjax_tl.experiments.workdir` apply: the directory is claimed for this run (its record), another run's
  files are never overwritten, and every round's write checks the claim. With ``resume`` the latest intact
  checkpoint in ``workdir`` is restored (its config must match; a damaged newer one is moved aside with a
  warning) and the run continues to ``rounds`` (with a warning, from round 0 if there is none); a run that
  already holds ``rounds`` rounds and its results is returned as it is, with nothing written.
  ``sampler`` and ``state_metrics`` go to ``run_rounds``.
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
                        evaluate_fn=evaluate_fn, on_round=show, round_metrics=round_metrics, sampler=sampler,
                        state_metrics=state_metrics)
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
                          round_metrics=round_metrics, bytes_so_far=so_far, sampler=sampler,
                          state_metrics=state_metrics)
  finally:
    writer.close()
    ckpt.close()
  return state, writer.rows


@dataclasses.dataclass
class Privacy:
  """What the DP flags ask for, built once per run by :func:`privacy_setup`.

  ``kwargs``: FedAvg keyword arguments (the transform pair of DP-FedAvg, an aggregator, or adaptive clipping);
  ``round_metrics(r)``: the epsilon spent after round r; ``sampler``: DP-FTRL's participation sampler (None: the
  default uniform cohorts); ``audit``: the canary audit (None: off); ``population``: the clients the accountant
  sees (the data's clients plus the canaries); ``dp_fedavg``: (clip, z, cohort) when DP-FedAvg is the transform
  pair.
  """

  kwargs: dict
  round_metrics: typing.Any = None
  sampler: typing.Any = None
  audit: typing.Any = None
  population: int = 0
  dp_fedavg: tuple | None = None
  accountant: str = "rdp"

  def attach(self, algorithm, data):
    """(algorithm, data) with the audit's canary clients, or both unchanged without an audit."""
    return (algorithm, data) if self.audit is None else self.audit.attach(algorithm, data)

  def state_metrics(self, rounds: int, delta: float):
    """``(round, state) -> dict``: the audit's result in the last round's record (None without an audit)."""
    if self.audit is None:
      return None
    return lambda r, state: self.audit.result(state, delta) if r == rounds else {}

  def statement(self, algorithm, rounds: int, delta: float, has_model_state: bool, audit: dict | None = None):
    """The run's privacy statement (:func:`fedjax_tl.privacy.privacy_statement`)."""
    from fedjax_tl.privacy.statement import privacy_statement

    return privacy_statement(algorithm, population=self.population, rounds=rounds, delta=delta, sampler=self.sampler,
                             accountant=self.accountant, audit=audit, has_model_state=has_model_state,
                             dp_fedavg=self.dp_fedavg)


@functools.lru_cache(maxsize=8)
def _ftrl(strategy: str, clip: float, z: float, epsilon: float, delta: float, rounds: int, population: int,
          min_sep: int):
  """The DP-FTRL aggregator (cached: the flag rules build it to check it, the run uses the same one)."""
  from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy

  if strategy == "banded":
    mf = MFStrategy.banded(rounds, min(min_sep, rounds))
  elif strategy == "blt":
    mf = MFStrategy.blt(rounds, min_sep=min_sep)
  else:
    mf = MFStrategy.identity()
  if epsilon > 0:
    return DPFTRL.calibrated(epsilon, delta, clip=clip, strategy=mf, rounds=rounds, population=population,
                             min_sep=min_sep)
  return DPFTRL(clip, z, mf, rounds, population, min_sep=min_sep)


def ftrl_min_sep(cfg) -> int:
  """DP-FTRL's participation gap: --dp_min_sep, or the population over the cohort (each client once per pass)."""
  return cfg.dp_min_sep or (cfg.num_clients + cfg.dp_audit) // cfg.clients_per_round


def ftrl_aggregator(cfg):
  return _ftrl(cfg.dp_ftrl_strategy, cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_epsilon, cfg.dp_delta, cfg.rounds,
               cfg.num_clients + cfg.dp_audit, ftrl_min_sep(cfg))


def privacy_setup(cfg, num_clients: int, log=print) -> Privacy:
  """The DP pieces a config asks for (see :class:`TransformFlags`): DP-FedAvg (``dp_clip`` with
  ``dp_noise_multiplier`` or a calibrated ``dp_epsilon``; adaptive clipping with ``dp_adaptive``), DP-FTRL
  (``dp_mechanism=ftrl``) and the canary audit (``dp_audit``). ``num_clients``: the data's clients; with an audit
  the canaries join them in the accountant's population.

  DP-FedAvg accounting assumes the fixed-size uniform cohorts ``sample_clients`` draws (replace-one, sensitivity
  2 * clip), with either accountant ("pld" is tighter, "rdp" faster; :mod:`fedjax_tl.privacy.accounting`).
  Without an audit, DP-FedAvg is the transform pair (clip on the client, noise on the server), which composes
  with secure aggregation; an audited run uses the ``DPFedAvg`` aggregator (the same clip, noise and uniform mean,
  in the aggregator the canaries are scored at). DP-FTRL is the ``DPFTRL`` aggregator with a
  :class:`~fedjax_tl.privacy.ParticipationSampler` (cyclic groups, each client once every ``dp_min_sep`` rounds).
  """
  from fedjax_tl.aggregators import DPFedAvg
  from fedjax_tl.privacy import accounting
  from fedjax_tl.transforms import dp_fedavg

  population = num_clients + cfg.dp_audit
  if cfg.dp_epsilon <= 0 and cfg.dp_clip <= 0:
    return Privacy({}, population=population)
  m = cfg.clients_per_round
  audit = None
  if cfg.dp_audit:
    from fedjax_tl.privacy.audit import CanaryAudit

    audit = CanaryAudit(cfg.dp_audit, seed=cfg.seed, confidence=cfg.dp_audit_confidence)
    log(f"privacy audit: {cfg.dp_audit} canary clients join the {num_clients} (about half held in); epsilon_audit, "
        f"a lower bound at {cfg.dp_audit_confidence:.0%} confidence, is reported with the last round")
  if cfg.dp_mechanism == "ftrl":
    from fedjax_tl.privacy.dp_ftrl import ParticipationSampler

    agg = ftrl_aggregator(cfg)
    sampler = ParticipationSampler(population, ftrl_min_sep(cfg), cohort_size=m, seed=cfg.seed)
    log(f"DP-FTRL: {agg.describe()}; {sampler.describe()}")
    eps = lambda r: {"epsilon": agg.epsilon(cfg.dp_delta, r), "noise_multiplier": agg.noise_multiplier}  # noqa: E731
    return Privacy({"aggregator": agg}, eps, sampler, audit, population, accountant=cfg.dp_accountant)
  z = cfg.dp_noise_multiplier
  if cfg.dp_epsilon > 0:
    z = rules.calibrated_noise_multiplier(cfg.dp_epsilon, population, m, cfg.rounds, cfg.dp_delta, cfg.dp_accountant)
  if z == 0:
    log("warning: --dp_clip without --dp_noise_multiplier or --dp_epsilon clips the updates but adds no noise: "
        "no privacy (epsilon is infinite).")
  log(f"DP-FedAvg: clip {cfg.dp_clip}, noise multiplier {z:.4f} (noise std on the mean {z * cfg.dp_clip / m:.4g}), "
      f"delta {cfg.dp_delta}, {cfg.dp_accountant} accountant, fixed sampling")
  eps = lambda r: {  # noqa: E731
      "epsilon": accounting.epsilon(z, population, m, r, cfg.dp_delta, cfg.dp_accountant, "fixed"),
      "noise_multiplier": z}
  if cfg.dp_adaptive:
    from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping

    ac = AdaptiveClipping(z, m, initial_clip=cfg.dp_clip, target_quantile=cfg.dp_target_quantile,
                          count_stddev=cfg.dp_count_stddev or None)
    log(f"adaptive clipping: initial clip {cfg.dp_clip}, target quantile {cfg.dp_target_quantile}, count noise "
        f"std {ac.sigma_b:.4g}, delta noise multiplier {ac.delta_noise_multiplier:.4f}")
    return Privacy({"adaptive_clip": ac, "weighting": "uniform"}, eps, None, audit, population,
                   accountant=cfg.dp_accountant)
  # The aggregator when the algorithm sends a message besides the delta (SCAFFOLD, FedNova): DPFedAvg clips the two
  # jointly and noises both, which the transform pair below (clip the delta, noise the mean delta) would not.
  has_message = getattr(cfg, "algorithm", "fedavg") in ("scaffold", "fednova")
  if audit is not None or has_message:
    return Privacy({"aggregator": DPFedAvg(cfg.dp_clip, z, m)}, eps, None, audit, population,
                   accountant=cfg.dp_accountant)
  client, server = dp_fedavg(cfg.dp_clip, z, m)
  return Privacy({"client_transform": client, "server_transform": server, "weighting": "uniform"}, eps, None, None,
                 population, (cfg.dp_clip, z, m), cfg.dp_accountant)


def dp_setup(cfg, population: int, log=print):
  """(FedAvg keyword arguments, round_metrics) of :func:`privacy_setup` (``population``: the data's clients)."""
  p = privacy_setup(cfg, population, log)
  return p.kwargs, p.round_metrics


def transform_setup(cfg, population: int, log=print, privacy: Privacy | None = None):
  """FedAvg keyword arguments for the update transforms a config asks for, and the round_metrics function.

  ``cfg`` has the :class:`TransformFlags` fields: the DP ones (see :func:`dp_setup`), ``compress`` (uplink
  compressor, e.g. "topk:0.01", "int8", "qsgd:4", "sign"; see ``transforms.compression.parse``), ``downlink``
  (compressor of the broadcast model, e.g. "int8") and ``secure_agg`` with ``secagg_clip`` / ``secagg_dropout``.
  DP clipping runs before compression (the noise is added on the server). ``privacy``: the run's
  :func:`privacy_setup` (built here if not given).
  """
  import jax.numpy as jnp

  from fedjax_tl.transforms import chain, compression
  from fedjax_tl.transforms.base import is_stateless
  from fedjax_tl.transforms.secure_agg import SecureAggregation

  privacy = privacy_setup(cfg, population, log) if privacy is None else privacy
  kwargs, round_metrics = dict(privacy.kwargs), privacy.round_metrics
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
  if adaptive is not None and secure is not None:  # the clip bits are masked with the updates
    kw["aggregator"] = dc.replace(secure, weighting="uniform", inner=adaptive)
  elif adaptive is not None:
    kw["aggregator"] = adaptive
  elif secure is not None:
    kw["aggregator"] = dc.replace(secure, weighting=weighting)
  elif weighting != "num_examples" and "aggregator" not in kw:
    kw["aggregator"] = aggregators.Mean(weighting)
  return kw
