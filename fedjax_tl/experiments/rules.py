"""The table of flag rules the experiments share: every flag and flag combination is checked here, before any
data, weights or pretraining, and a broken rule is a one-line usage error naming the flag and the fix.

Each rule names the flags it reads and the command lines that break it (``bad``); ``tests/test_cli.py`` walks
the whole table with those examples and checks that each one ends with exit code 2 and one line before any
loader runs. An experiment adds its own rules with the same :func:`rule` decorator (``digits.py``,
``cifar10.py``); :func:`validate` runs the rules of one experiment in the order they were registered.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from collections.abc import Callable

from fedjax_tl.experiments.errors import ConfigError

__all__ = ["Rule", "RULES", "rule", "validate", "check", "parse_ints", "installed", "calibrated_noise_multiplier"]

ALL = ("digits", "cifar10", "plan")  # the entry points; "plan" is the TPU planner over cifar10's flags


@dataclasses.dataclass(frozen=True)
class Rule:
  """One check of the flag table: ``check(cfg)`` raises :class:`ConfigError`; ``bad`` lists command lines (flag
  lists, added to the experiment's smallest preset) that break it; ``experiments`` the entry points it applies
  to."""

  name: str
  flags: tuple
  bad: tuple
  check: Callable
  experiments: tuple


RULES: list[Rule] = []


def rule(*flags: str, bad, experiments=ALL):
  """Registers the decorated ``fn(cfg)`` as a rule over ``flags``; ``bad``: a list of argv lists breaking it."""

  def register(fn):
    RULES.append(Rule(fn.__name__, tuple(flags), tuple(tuple(b) for b in bad), fn, tuple(experiments)))
    return fn

  return register


def validate(cfg, experiment: str) -> None:
  """Runs every rule of ``experiment`` on ``cfg`` (raises the first :class:`ConfigError`)."""
  for r in RULES:
    if experiment in r.experiments:
      r.check(cfg)


def check(condition: bool, message: str) -> None:
  """Raises :class:`ConfigError` with ``message`` unless ``condition``."""
  if not condition:
    raise ConfigError(message)


def parse_ints(text: str, flag: str) -> list[int]:
  """'1,2,3' -> [1, 2, 3]; anything else is a ConfigError naming ``flag``."""
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--{flag}={text!r}: expected comma-separated integers, e.g. --{flag}=1,2,3.") from None


def installed(module: str) -> bool:
  """Whether ``module`` can be imported (without importing it)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # ValueError: a module blocked with sys.modules[name] = None
    return False


@functools.lru_cache(maxsize=32)
def calibrated_noise_multiplier(epsilon: float, population: int, cohort: int, rounds: int, delta: float,
                                accountant: str) -> float:
  """The DP-FedAvg noise multiplier for a target epsilon (cached: the rules and the run ask for the same one)."""
  from fedjax_tl.privacy import accounting

  return accounting.calibrate_noise_multiplier(epsilon, population, cohort, rounds, delta, accountant, "fixed")


# ---------------------------------------------------------------------------------------------------------------
# Federation sizes, rates, schedule (every experiment)


@rule("seed", bad=[["--seed=-1"]])
def seed_non_negative(cfg):
  check(cfg.seed >= 0, f"--seed must be >= 0 (numpy's generators take no negative seeds), got {cfg.seed}.")


@rule("rounds", "num_clients", "clients_per_round", "local_epochs", "batch_size", "checkpoint_every",
      "keep_checkpoints", bad=[["--rounds=0"], ["--rounds=-3"], ["--num_clients=0"], ["--local_epochs=0"],
                               ["--batch_size=-1"], ["--checkpoint_every=0"], ["--keep_checkpoints=0"]])
def positive_counts(cfg):
  for name in ("rounds", "num_clients", "clients_per_round", "local_epochs", "batch_size", "checkpoint_every",
               "keep_checkpoints"):
    v = getattr(cfg, name)
    check(v >= 1, f"--{name} must be a positive integer, got {v}.")


@rule("clients_per_round", "num_clients", bad=[["--clients_per_round=500"]])
def cohort_within_population(cfg):
  canaries = getattr(cfg, "dp_audit", 0)  # the audit's canary clients are drawn with the others
  check(cfg.clients_per_round <= cfg.num_clients + canaries,
        f"--clients_per_round={cfg.clients_per_round} exceeds --num_clients={cfg.num_clients}"
        + (f" plus --dp_audit={canaries} canaries" if canaries else "") + "; lower it or add clients.")


@rule("client_lr", "server_lr", bad=[["--client_lr=0"], ["--server_lr=-1"], ["--client_lr=nan"]])
def positive_rates(cfg):
  for name in ("client_lr", "server_lr"):
    v = getattr(cfg, name)
    check(math.isfinite(v) and v > 0, f"--{name} must be a positive number, got {v}.")


@rule("partition", "alpha", bad=[["--partition=zipf"], ["--partition=dirichlet", "--alpha=0"]])
def known_partition(cfg):
  from fedjax_tl.data.partition import PARTITIONERS

  check(cfg.partition in PARTITIONERS, f"--partition={cfg.partition!r} is unknown; choose one of {PARTITIONERS}.")
  check(not (cfg.partition == "dirichlet" and not (math.isfinite(cfg.alpha) and cfg.alpha > 0)),
        f"--alpha must be > 0 for the dirichlet partition, got {cfg.alpha}.")


@rule("client_optimizer", bad=[["--client_optimizer=adamw"]])
def known_client_optimizer(cfg):
  from fedjax_tl.core.client import OPTIMIZERS

  check(cfg.client_optimizer in OPTIMIZERS,
        f"--client_optimizer={cfg.client_optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}.")


@rule("schedule", bad=[["--schedule=fast"], ["--schedule=chunked:0"]])
def known_schedule(cfg):
  from fedjax_tl.core.execution import Schedule

  try:
    if cfg.schedule.strip() != "auto":
      Schedule.parse(cfg.schedule)
  except ValueError as e:
    raise ConfigError(f"--schedule: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Update transforms: DP-FedAvg, adaptive clipping, secure aggregation, compression


@rule("dp_clip", "dp_noise_multiplier", "dp_epsilon", "dp_count_stddev",
      bad=[["--dp_epsilon=-1"], ["--dp_epsilon=-1", "--dp_clip=0.5"], ["--dp_clip=inf"]])
def dp_values(cfg):
  for name in ("dp_clip", "dp_noise_multiplier", "dp_epsilon", "dp_count_stddev"):
    v = getattr(cfg, name)
    check(math.isfinite(v) and v >= 0, f"--{name} must be >= 0 (0 = off), got {v}.")


@rule("dp_epsilon", "dp_noise_multiplier", bad=[["--dp_clip=0.5", "--dp_epsilon=8", "--dp_noise_multiplier=1"]])
def dp_one_noise_source(cfg):
  check(not (cfg.dp_epsilon > 0 and cfg.dp_noise_multiplier > 0),
        "Give --dp_epsilon (the noise is calibrated to it) or --dp_noise_multiplier, not both.")


@rule("dp_clip", "dp_epsilon", "dp_noise_multiplier", "dp_adaptive",
      bad=[["--dp_noise_multiplier=1.0"], ["--dp_epsilon=8"], ["--dp_adaptive=true"]])
def dp_needs_clip(cfg):
  if cfg.dp_clip <= 0:
    for name in ("dp_epsilon", "dp_noise_multiplier"):
      check(getattr(cfg, name) <= 0, f"--{name} needs a clipping norm: set --dp_clip > 0 (e.g. --dp_clip=0.5).")
    check(not cfg.dp_adaptive, "--dp_adaptive=true needs the initial clipping norm: set --dp_clip > 0.")


@rule("dp_delta", "dp_accountant", "dp_target_quantile",
      bad=[["--dp_delta=0"], ["--dp_accountant=gdp"], ["--dp_clip=0.5", "--dp_adaptive=true",
                                                        "--dp_target_quantile=1"]])
def dp_parameters(cfg):
  check(0 < cfg.dp_delta < 1, f"--dp_delta must be in (0, 1), got {cfg.dp_delta}.")
  check(cfg.dp_accountant in ("rdp", "pld"), f"--dp_accountant must be 'rdp' or 'pld', got {cfg.dp_accountant!r}.")
  check(0 < cfg.dp_target_quantile < 1, f"--dp_target_quantile must be in (0, 1), got {cfg.dp_target_quantile}.")


_DEFAULTS: dict = {}


def _population(cfg) -> int:
  """The clients the accountant sees: the data's and the audit's canaries."""
  return cfg.num_clients + getattr(cfg, "dp_audit", 0)


def _default(cfg, name):
  cls = type(cfg)
  if cls not in _DEFAULTS:
    _DEFAULTS[cls] = {f.name: f.default for f in dataclasses.fields(cls)}
  return _DEFAULTS[cls][name]


def _set(cfg, name) -> bool:
  """Whether ``--name`` differs from the field's default (presets never set the flags checked with this)."""
  return getattr(cfg, name) != _default(cfg, name)


@rule("dp_delta", "dp_accountant", "dp_adaptive", "dp_target_quantile", "dp_count_stddev", "secagg_clip",
      "secagg_dropout", bad=[["--dp_delta=1e-6"], ["--dp_accountant=pld"],
                             ["--dp_clip=0.5", "--dp_target_quantile=0.7"], ["--dp_clip=0.5", "--dp_count_stddev=1"],
                             ["--secagg_clip=0.5"], ["--secagg_dropout=0.1"]])
def no_ignored_privacy_flags(cfg):
  dp = cfg.dp_clip > 0
  for name in ("dp_delta", "dp_accountant"):
    check(dp or not _set(cfg, name), f"--{name} is for DP-FedAvg, which is off: add --dp_clip and --dp_epsilon (or "
          f"drop --{name}).")
  for name in ("dp_target_quantile", "dp_count_stddev"):
    check(cfg.dp_adaptive or not _set(cfg, name), f"--{name} is for adaptive clipping: add --dp_adaptive=true (or "
          f"drop --{name}).")
  for name in ("secagg_clip", "secagg_dropout"):
    check(cfg.secure_agg or not _set(cfg, name), f"--{name} is for secure aggregation: add --secure_agg=true (or "
          f"drop --{name}).")


@rule("dp_epsilon", "dp_delta", "rounds", "clients_per_round", "num_clients",
      bad=[["--dp_clip=0.5", "--dp_epsilon=0.0001", "--rounds=50"]])
def dp_epsilon_reachable(cfg):
  if cfg.dp_epsilon <= 0 or cfg.dp_clip <= 0:
    return
  from fedjax_tl.privacy import accounting

  top = 1000.0
  eps = accounting.epsilon(top, _population(cfg), cfg.clients_per_round, cfg.rounds, cfg.dp_delta, "rdp", "fixed")
  check(eps <= cfg.dp_epsilon,
        f"--dp_epsilon={cfg.dp_epsilon} at --dp_delta={cfg.dp_delta} is out of reach over --rounds={cfg.rounds} of "
        f"--clients_per_round={cfg.clients_per_round} of --num_clients={cfg.num_clients}: even noise multiplier "
        f"{top:g} spends {eps:.3g}. Use fewer rounds, a smaller cohort, more clients, a larger --dp_delta or a "
        "larger --dp_epsilon.")


@rule("dp_adaptive", "dp_count_stddev", "dp_noise_multiplier", "dp_epsilon",
      bad=[["--dp_clip=0.5", "--dp_adaptive=true", "--dp_noise_multiplier=5"]])
def adaptive_clip_count_noise(cfg):
  if not cfg.dp_adaptive or cfg.dp_clip <= 0:
    return
  z = cfg.dp_noise_multiplier
  if cfg.dp_epsilon > 0:
    z = calibrated_noise_multiplier(cfg.dp_epsilon, _population(cfg), cfg.clients_per_round, cfg.rounds,
                                    cfg.dp_delta, "rdp")
  sigma_b = cfg.dp_count_stddev or cfg.clients_per_round / 20
  check(z == 0 or 2 * sigma_b > z,
        f"--dp_adaptive=true needs the count noise 2 * --dp_count_stddev > the noise multiplier {z:.4g} "
        f"(count noise std now {sigma_b:.4g}{' = --clients_per_round / 20' if not cfg.dp_count_stddev else ''}): "
        f"set --dp_count_stddev={z / 2 * 1.25:.3g} or more (Andrew et al. 2021 split the noise between the two).")


@rule("dp_adaptive", "secure_agg", "secagg_clip",
      bad=[["--dp_clip=0.5", "--dp_adaptive=true", "--secure_agg=true", "--secagg_clip=0.5"]])
def adaptive_clip_under_secure_agg(cfg):
  check(not (cfg.dp_adaptive and cfg.secure_agg and cfg.secagg_clip < 1),
        f"--dp_adaptive=true with --secure_agg=true masks the clip bits (0 or 1) with the updates: they must pass "
        f"the coordinate clip, so --secagg_clip must be >= 1 (got {cfg.secagg_clip}).")


@rule("dp_mechanism", "dp_ftrl_strategy", "dp_min_sep",
      bad=[["--dp_clip=0.5", "--dp_mechanism=dpsgd"], ["--dp_mechanism=ftrl"], ["--dp_ftrl_strategy=blt"],
           ["--dp_min_sep=2"], ["--dp_clip=0.5", "--dp_mechanism=ftrl", "--dp_ftrl_strategy=toeplitz"],
           ["--dp_clip=0.5", "--dp_mechanism=ftrl", "--dp_min_sep=-1"]])
def dp_mechanism_flags(cfg):
  check(cfg.dp_mechanism in ("fedavg", "ftrl"), f"--dp_mechanism must be fedavg (DP-FedAvg) or ftrl (DP-FTRL), got "
        f"{cfg.dp_mechanism!r}.")
  ftrl = cfg.dp_mechanism == "ftrl"
  check(not ftrl or cfg.dp_clip > 0, "--dp_mechanism=ftrl needs a clipping norm: set --dp_clip > 0 (and "
        "--dp_epsilon or --dp_noise_multiplier).")
  for name in ("dp_ftrl_strategy", "dp_min_sep"):
    check(ftrl or not _set(cfg, name), f"--{name} is for DP-FTRL: add --dp_mechanism=ftrl (or drop --{name}).")
  check(cfg.dp_ftrl_strategy in ("banded", "blt", "identity"),
        f"--dp_ftrl_strategy must be banded, blt or identity, got {cfg.dp_ftrl_strategy!r}.")
  check(cfg.dp_min_sep >= 0, f"--dp_min_sep must be >= 0 (0 = clients / cohort), got {cfg.dp_min_sep}.")


@rule("dp_mechanism", "dp_adaptive", "secure_agg", "dp_min_sep", "clients_per_round", "num_clients",
      bad=[["--dp_clip=0.5", "--dp_mechanism=ftrl", "--dp_adaptive=true"],
           ["--dp_clip=0.5", "--dp_mechanism=ftrl", "--secure_agg=true"],
           ["--dp_clip=0.5", "--dp_mechanism=ftrl", "--dp_min_sep=500"]])
def dp_ftrl_combinations(cfg):
  if cfg.dp_mechanism != "ftrl" or cfg.dp_clip <= 0:
    return
  check(not cfg.dp_adaptive, "--dp_mechanism=ftrl with --dp_adaptive=true: DP-FTRL's sensitivity needs a fixed clip; "
        "use one of them.")
  check(not cfg.secure_agg, "--dp_mechanism=ftrl with --secure_agg=true: the server adds DP-FTRL's noise to the "
        "sum it sees, which secure aggregation hides (it would need distributed noise); use one of them.")
  population = _population(cfg)
  min_sep = cfg.dp_min_sep or population // cfg.clients_per_round
  check(min_sep >= 1 and population // min_sep >= cfg.clients_per_round,
        f"--dp_min_sep={min_sep} splits the {population} clients into groups of {population // max(min_sep, 1)}, "
        f"fewer than --clients_per_round={cfg.clients_per_round}: lower --dp_min_sep (at most "
        f"{max(population // cfg.clients_per_round, 1)}) or --clients_per_round.")


@rule("dp_epsilon", "dp_noise_multiplier", "dp_ftrl_strategy", "rounds",
      bad=[["--dp_clip=0.5", "--dp_mechanism=ftrl", "--dp_noise_multiplier=0"]])
def dp_ftrl_builds(cfg):
  """DP-FTRL's strategy is optimised and its noise calibrated here, before the data (cached for the run)."""
  if cfg.dp_mechanism != "ftrl" or cfg.dp_clip <= 0 or not installed("jax_privacy"):
    return
  check(cfg.dp_epsilon > 0 or cfg.dp_noise_multiplier > 0, "--dp_mechanism=ftrl needs noise: set --dp_epsilon "
        "(calibrated) or --dp_noise_multiplier.")
  from fedjax_tl.experiments.common import ftrl_aggregator

  try:
    ftrl_aggregator(cfg)
  except ValueError as e:
    raise ConfigError(f"--dp_mechanism=ftrl: {e}") from None


@rule("dp_audit", "dp_audit_confidence", "dp_clip", "secure_agg", "personal_eval", "algorithm",
      bad=[["--dp_audit=100"], ["--dp_clip=0.5", "--dp_audit=1"], ["--dp_clip=0.5", "--dp_audit=-5"],
           ["--dp_audit_confidence=0.9"], ["--dp_clip=0.5", "--dp_audit=100", "--dp_audit_confidence=1"],
           ["--dp_clip=0.5", "--dp_audit=100", "--secure_agg=true"],
           ["--dp_clip=0.5", "--dp_audit=100", "--personal_eval=true"]])
def dp_audit_flags(cfg):
  check(cfg.dp_audit == 0 or cfg.dp_audit >= 2, f"--dp_audit is the number of canary clients, at least 2 (some "
        f"held in, some held out; hundreds for a useful bound), got {cfg.dp_audit}.")
  check(cfg.dp_audit == 0 or cfg.dp_clip > 0, "--dp_audit checks a DP run: add --dp_clip and --dp_epsilon (the "
        "canaries are scaled to the clip).")
  check(cfg.dp_audit > 0 or not _set(cfg, "dp_audit_confidence"), "--dp_audit_confidence is for the audit: add "
        "--dp_audit=N (or drop --dp_audit_confidence).")
  check(0 < cfg.dp_audit_confidence < 1, f"--dp_audit_confidence must be in (0, 1), got {cfg.dp_audit_confidence}.")
  if cfg.dp_audit:
    from fedjax_tl.experiments.algorithms import PERSONALIZED

    check(not cfg.secure_agg, "--dp_audit with --secure_agg=true: the audit scores the DP aggregator's released "
          "update, and DP-FedAvg under secure aggregation is clipped and noised outside it; audit without "
          "--secure_agg.")
    check(not (cfg.personal_eval or cfg.algorithm in PERSONALIZED), "--dp_audit with a personalized evaluation: "
          "the canary clients hold no examples to evaluate; drop --personal_eval (and use a global algorithm).")


@rule("dp_mechanism", "dp_audit", bad=[])  # broken only without jax-privacy: tests/test_cli.py blocks the import
def privacy_installed(cfg):
  needs = [f for f, on in (("--dp_mechanism=ftrl", cfg.dp_mechanism == "ftrl"), ("--dp_audit", cfg.dp_audit > 0))
           if on]
  check(not needs or installed("jax_privacy"), f"{' and '.join(needs)} need jax-privacy, which is not installed: "
        "pip install -e \".[privacy]\" (the privacy extra).")


@rule("secagg_clip", "secagg_dropout", bad=[["--secure_agg=true", "--secagg_clip=0"],
                                            ["--secure_agg=true", "--secagg_dropout=1"]])
def secure_agg_parameters(cfg):
  check(math.isfinite(cfg.secagg_clip) and cfg.secagg_clip > 0,
        f"--secagg_clip must be > 0, got {cfg.secagg_clip}.")
  check(0 <= cfg.secagg_dropout < 1, f"--secagg_dropout must be in [0, 1), got {cfg.secagg_dropout}.")


@rule("compress", "downlink", bad=[["--compress=topk"], ["--downlink=topk:0.1"], ["--compress=qsgd:1"]])
def known_compressors(cfg):
  import jax.numpy as jnp

  from fedjax_tl.transforms import compression
  from fedjax_tl.transforms.base import is_stateless

  for name in ("compress", "downlink"):
    try:
      compressor = compression.parse(getattr(cfg, name))
    except ValueError as e:
      raise ConfigError(f"--{name}: {e}") from None
    if name == "downlink" and compressor is not None and not is_stateless(compressor, {"probe": jnp.zeros((4,))}):
      raise ConfigError(f"--downlink={cfg.downlink} needs error feedback, which a broadcast cannot have; use "
                        "int8, qsgd:B or a '/noef' compressor.")


# ---------------------------------------------------------------------------------------------------------------
# Model compression: pruning and quantization


@rule("quantize", bad=[["--quantize=int4"], ["--quantize=INT8"]])
def known_quantization(cfg):
  from fedjax_tl.compress.flags import QUANTIZE

  check(cfg.quantize in QUANTIZE, f"--quantize={cfg.quantize!r} is unknown; choose one of {QUANTIZE}.")


@rule("quantize", bad=[])  # broken only without qwix installed: tests/test_cli.py blocks the import
def quantization_installed(cfg):
  check(cfg.quantize == "none" or installed("qwix"),
        f"--quantize={cfg.quantize} needs qwix, which is not installed: pip install -e \".[compress]\" (the compress "
        "extra).")


@rule("prune", "prune_scope", "prune_schedule",
      bad=[["--prune=1"], ["--prune=-0.1"], ["--prune=0.5", "--prune_scope=block"], ["--prune_scope=layer"],
           ["--prune_schedule=start"]])
def pruning_values(cfg):
  check(0.0 <= cfg.prune < 1.0, f"--prune is the final sparsity, in [0, 1); got {cfg.prune}.")
  check(cfg.prune_scope in ("global", "layer"), f"--prune_scope must be 'global' or 'layer', got {cfg.prune_scope!r}.")
  for name in ("prune_scope", "prune_schedule"):
    check(cfg.prune > 0 or not _set(cfg, name), f"--{name} is for pruning, which is off: add --prune=S (e.g. "
          f"--prune=0.5), or drop --{name}.")


def prune_schedule_rounds(spec: str, rounds: int) -> tuple[str, int, int, int]:
  """``--prune_schedule`` as (kind, begin, end, frequency), checked against ``rounds`` (ConfigError)."""
  usage = "use poly, poly:BEGIN:END, poly:BEGIN:END:FREQ (rounds), start or final"
  name, *args = spec.strip().split(":")
  if name in ("start", "final") and not args:
    return name, 0, 1, 1
  check(name == "poly" and len(args) in (0, 2, 3), f"--prune_schedule={spec!r} is unknown: {usage}.")
  if not args:
    return "poly", 0, max(rounds // 2, 1), 1
  try:
    begin, end, *freq = (int(a) for a in args)
  except ValueError:
    raise ConfigError(f"--prune_schedule={spec!r}: BEGIN, END and FREQ are whole rounds; {usage}.") from None
  freq = freq[0] if freq else 1
  check(0 <= begin < end, f"--prune_schedule={spec}: pruning must begin at a round >= 0 before it ends (BEGIN < END).")
  check(end <= rounds, f"--prune_schedule={spec} ends at round {end}, after --rounds={rounds}: the final sparsity "
        f"would never be reached. Use END <= {rounds}, or more --rounds.")
  check(freq >= 1, f"--prune_schedule={spec}: FREQ (prune every FREQ rounds) must be >= 1.")
  return "poly", begin, end, freq


@rule("prune_schedule", "rounds", bad=[["--prune=0.5", "--prune_schedule=cubic"],
                                       ["--prune=0.5", "--prune_schedule=poly:5:2"],
                                       ["--prune=0.5", "--prune_schedule=poly:0:x"],
                                       ["--prune=0.5", "--prune_schedule=poly:0:2:0"],
                                       ["--prune=0.5", "--rounds=2", "--prune_schedule=poly:0:9"]])
def pruning_schedule(cfg):
  if cfg.prune > 0:
    prune_schedule_rounds(cfg.prune_schedule, cfg.rounds)


@rule("prune", "compress", "downlink", "secure_agg",
      bad=[["--prune=0.5", "--compress=int8"], ["--prune=0.5", "--downlink=int8"],
           ["--prune=0.5", "--secure_agg=true"]])
def pruning_alone_on_the_wire(cfg):
  if cfg.prune <= 0 or cfg.prune_schedule.strip() == "final":
    return
  check(cfg.compress == "none" and cfg.downlink == "none",
        "--prune counts the up- and downlink as sparse and cannot be stacked on --compress or --downlink; use one "
        "of them (or --prune_schedule=final, which prunes after training).")
  check(not cfg.secure_agg, "--prune with --secure_agg=true: masked sums are dense field vectors; use one of them "
        "(or --prune_schedule=final, which prunes after training).")


# ---------------------------------------------------------------------------------------------------------------
# Algorithms (experiments/algorithms.py)


def _transforms_in_use(cfg) -> list[str]:
  flags = [("compress", "none"), ("downlink", "none"), ("dp_clip", 0.0), ("dp_epsilon", 0.0), ("secure_agg", False),
           ("prune", 0.0), ("quantize", "none")]
  return [f"--{f}={_show(getattr(cfg, f))}" for f, off in flags if getattr(cfg, f, off) != off]


def _show(v) -> str:
  return str(v).lower() if isinstance(v, bool) else str(v)


_HYPER = {"prox_mu": "fedprox", "scaffold_option": "scaffold", "dyn_alpha": "feddyn", "head_steps": "fedrep",
          "ditto_lambda": "ditto", "mime_beta": "mimelite", "ifca_models": "ifca", "qffl_q": "qffl",
          "fedlc_tau": "fedlc", "moon_mu": "moon", "apfl_alpha": "apfl"}
# (flag -> the algorithm it belongs to: with another one it would be ignored)


@rule("algorithm", bad=[["--algorithm=fedsgd"]])
def known_algorithm(cfg):
  from fedjax_tl.experiments.algorithms import ALGORITHMS

  check(cfg.algorithm in ALGORITHMS, f"--algorithm={cfg.algorithm!r} is unknown; choose one of {ALGORITHMS}.")


@rule("prox_mu", "scaffold_option", "dyn_alpha", "head_steps", "ditto_lambda", "mime_beta", "ifca_models", "qffl_q",
      "fedlc_tau", "moon_mu", "apfl_alpha",
      bad=[["--prox_mu=0.5"], ["--ditto_lambda=1", "--algorithm=fedprox"], ["--head_steps=2"], ["--mime_beta=0.5"],
           ["--ifca_models=3"], ["--qffl_q=2"], ["--fedlc_tau=0.5"], ["--moon_mu=2", "--algorithm=ifca"]])
def hyperparameters_of_their_algorithm(cfg):
  for flag, owner in _HYPER.items():
    check(cfg.algorithm == owner or not _set(cfg, flag),
          f"--{flag}={getattr(cfg, flag)} is for --algorithm={owner} (got --algorithm={cfg.algorithm}).")


@rule("scaffold_option", "prox_mu", "dyn_alpha", "ditto_lambda", "head_steps", "mime_beta", "ifca_models", "qffl_q",
      "fedlc_tau", "moon_mu", "apfl_alpha",
      bad=[["--algorithm=scaffold", "--scaffold_option=III"], ["--algorithm=fedprox", "--prox_mu=-1"],
           ["--algorithm=feddyn", "--dyn_alpha=-1"], ["--algorithm=ditto", "--ditto_lambda=-1"],
           ["--algorithm=mimelite", "--mime_beta=1"], ["--algorithm=ifca", "--ifca_models=0"],
           ["--algorithm=qffl", "--qffl_q=-1"], ["--algorithm=fedlc", "--fedlc_tau=-1"],
           ["--algorithm=moon", "--moon_mu=-1"], ["--algorithm=apfl", "--apfl_alpha=1.5"],
           ["--algorithm=fedrep", "--head_steps=-1"]])
def algorithm_hyperparameter_values(cfg):
  check(cfg.scaffold_option in ("I", "II"), f"--scaffold_option must be I or II, got {cfg.scaffold_option!r}.")
  for name in ("prox_mu", "dyn_alpha", "ditto_lambda", "head_steps", "qffl_q", "fedlc_tau", "moon_mu"):
    check(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}.")
  check(0 <= cfg.mime_beta < 1, f"--mime_beta must be in [0, 1), got {cfg.mime_beta}.")
  check(cfg.ifca_models >= 1, f"--ifca_models must be >= 1, got {cfg.ifca_models}.")
  check(0 <= cfg.apfl_alpha <= 1, f"--apfl_alpha must be in [0, 1], got {cfg.apfl_alpha}.")


@rule("algorithm", "client_optimizer", "dp_clip", "secure_agg",
      bad=[["--algorithm=qffl", "--client_optimizer=adam"], ["--algorithm=mimelite", "--client_optimizer=momentum"],
           ["--algorithm=ifca", "--dp_clip=1", "--dp_noise_multiplier=1"], ["--algorithm=qffl", "--secure_agg=true"]],
      experiments=("digits", "cifar10"))
def algorithms_with_their_assumptions(cfg):
  if cfg.algorithm in ("qffl", "mimelite"):
    check(cfg.client_optimizer == "sgd", f"--algorithm={cfg.algorithm} steps the clients with plain SGD (its update "
          f"uses the client learning rate as SGD's); got --client_optimizer={cfg.client_optimizer}: use "
          "--client_optimizer=sgd.")
  if cfg.algorithm in ("ifca", "qffl"):
    check(not cfg.dp_clip and not cfg.secure_agg, f"--algorithm={cfg.algorithm} rescales the examples-weighted mean "
          "of the clients' updates, which DP-FedAvg (a uniform, clipped, noised mean) and secure aggregation change: "
          "drop --dp_clip / --secure_agg or choose another algorithm.")


@rule("personal_fraction", "finetune_steps", "personal_eval",
      bad=[["--personal_eval=true", "--personal_fraction=1"], ["--personal_eval=true", "--finetune_steps=-1"],
           ["--finetune_steps=3"], ["--personal_fraction=0.3"]])
def personal_evaluation(cfg):
  from fedjax_tl.experiments.algorithms import PERSONALIZED

  check(0 < cfg.personal_fraction < 1, f"--personal_fraction must be in (0, 1), got {cfg.personal_fraction}.")
  check(cfg.finetune_steps >= 0, f"--finetune_steps must be >= 0, got {cfg.finetune_steps}.")
  personal = cfg.personal_eval or cfg.algorithm in PERSONALIZED
  for name in ("finetune_steps", "personal_fraction"):
    check(personal or not _set(cfg, name), f"--{name} is for the personalized evaluation: add "
          "--personal_eval=true.")


@rule("algorithm", "client_optimizer", bad=[["--algorithm=scaffold", "--client_optimizer=adam"],
                                            ["--algorithm=fednova", "--client_optimizer=adam"]])
def algorithm_client_optimizer(cfg):
  a = cfg.algorithm
  check(a != "scaffold" or cfg.scaffold_option == "I" or cfg.client_optimizer == "sgd",
        f"--algorithm=scaffold (option II) assumes plain SGD clients: use --client_optimizer=sgd "
        f"(got {cfg.client_optimizer}).")
  check(a != "fednova" or cfg.client_optimizer in ("sgd", "momentum"),
        f"--algorithm=fednova normalises SGD or momentum-SGD steps: use --client_optimizer=sgd or momentum "
        f"(got {cfg.client_optimizer}).")


@rule("algorithm", "dp_clip", "secure_agg", "compress", "downlink", "prune", "quantize", "dp_mechanism", "dp_audit",
      bad=[["--algorithm=scaffold", "--client_optimizer=sgd", "--dp_clip=0.5", "--secure_agg=true"],
           ["--algorithm=fednova", "--client_optimizer=sgd", "--dp_clip=0.5", "--dp_noise_multiplier=1",
            "--dp_mechanism=ftrl"],
           ["--algorithm=ditto", "--prune=0.5"],
           ["--algorithm=ditto", "--dp_clip=0.5", "--dp_noise_multiplier=1", "--dp_audit=8"]])
def algorithm_with_transforms(cfg):
  # SCAFFOLD's and FedNova's messages go through the aggregator with the delta (fedjax_tl.aggregators.Message):
  # DP-FedAvg (the aggregator the CLI builds for them) and adaptive clipping clip them jointly and noise them,
  # secure aggregation masks them. Two combinations stay refused: DP-FTRL does not encode a message, and DP under
  # secure aggregation clips the delta on the clients as an update transform, which does not cover the message.
  a, used = cfg.algorithm, _transforms_in_use(cfg)
  if a in ("scaffold", "fednova"):
    dp = [u for u in used if u.startswith("--dp")]
    check(not dp or cfg.dp_mechanism != "ftrl", f"--algorithm={a} sends a message besides the delta, which DP-FTRL "
          f"({dp}, --dp_mechanism=ftrl) does not encode; use --dp_mechanism=fedavg.")
    check(not dp or not cfg.secure_agg, f"--algorithm={a} with DP ({dp}) and --secure_agg=true: the DP clip runs on "
          "the clients as an update transform, which does not cover the algorithm's message; use DP or secure "
          "aggregation.")
  smaller = [u for u in used if u.startswith(("--prune", "--quantize"))]
  check(a != "ditto" or not smaller, f"--algorithm=ditto does not combine with {smaller} yet (its personal models "
        "would not be pruned or quantized); run it without them.")
  check(a != "ditto" or not getattr(cfg, "dp_audit", 0), "--algorithm=ditto does not combine with --dp_audit yet "
        "(the audit's canaries join a FedAvg's population); run it without.")


# ---------------------------------------------------------------------------------------------------------------
# Shared by the two experiments' own rules


def check_regex(value: str | None, flag: str) -> None:
  if value is not None:
    try:
      re.compile(value)
    except re.error as e:
      raise ConfigError(f"--{flag}={value!r} is not a regular expression ({e}).") from None
