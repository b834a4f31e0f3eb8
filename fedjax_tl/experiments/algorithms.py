"""The experiments' ``--algorithm`` flag and its hyper-parameters, shared by digits and cifar10.

    --algorithm=fedavg | fedavgm | fedadagrad | fedadam | fedyogi      server optimizer at --server_lr
              | fedprox (--prox_mu) | scaffold (--scaffold_option) | feddyn (--dyn_alpha) | fednova
              | fedper | fedrep (--head_steps) | fedbn | ditto (--ditto_lambda)               personalization
    --personal_eval=true     every client's accuracy on its own held-out examples each round (on by default
                             for the personalized algorithms), --personal_fraction of its examples held out,
                             optionally after --finetune_steps local steps

Personalized accuracy is reported as ``test_personal_accuracy`` (weighted by held-out examples),
``test_personal_accuracy_mean`` (over clients) and ``test_personal_accuracy_p10`` (10th percentile over clients),
next to the global model's ``test_accuracy``.
"""

from __future__ import annotations

import dataclasses

import optax

from fedjax_tl.algorithms.ditto import Ditto
from fedjax_tl.algorithms.feddyn import FedDyn
from fedjax_tl.algorithms.fednova import FedNova
from fedjax_tl.algorithms.fedopt import SERVER_OPTIMIZERS, server_optimizer
from fedjax_tl.algorithms.fedprox import fedprox
from fedjax_tl.algorithms.personal import BN_PARAMS, HeadThenBody
from fedjax_tl.algorithms.scaffold import Scaffold
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate_per_client
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.experiments.common import check

__all__ = ["AlgorithmFlags", "ALGORITHMS", "PERSONALIZED", "validate_algorithm", "algorithm_kwargs",
           "make_algorithm", "personal_eval"]

GLOBAL = (*SERVER_OPTIMIZERS, "fedprox", "scaffold", "feddyn", "fednova")
PERSONALIZED = ("fedper", "fedrep", "fedbn", "ditto")
ALGORITHMS = GLOBAL + PERSONALIZED
HEAD = "^head"  # the experiments' models name their classifier layers "head" (and "head_hidden<i>")
# flag -> the algorithm it belongs to (given with another algorithm it would be silently ignored: an error)
_HYPER = {"prox_mu": "fedprox", "scaffold_option": "scaffold", "dyn_alpha": "feddyn", "head_steps": "fedrep",
          "ditto_lambda": "ditto"}


@dataclasses.dataclass(frozen=True)
class AlgorithmFlags:
  """Algorithm fields shared by the experiments' configs."""

  algorithm: str = "fedavg"  # one of ALGORITHMS
  prox_mu: float = 0.01  # FedProx's proximal strength (--algorithm=fedprox)
  scaffold_option: str = "II"  # SCAFFOLD's control-variate update: II (from the model change) or I (a gradient)
  dyn_alpha: float = 0.01  # FedDyn's regularisation strength alpha (--algorithm=feddyn)
  head_steps: int = 5  # FedRep: local steps on the personal head before the body's steps (--algorithm=fedrep)
  ditto_lambda: float = 0.1  # Ditto's pull of the personal models to the global one (--algorithm=ditto)
  personal_eval: bool = False  # each client's accuracy on its own held-out examples (on for personalized ones)
  personal_fraction: float = 0.2  # share of every client's examples held out for --personal_eval
  finetune_steps: int = 0  # personalized evaluation after this many local steps from the evaluated model


def _transforms_in_use(cfg) -> list[str]:
  flags = [("compress", "none"), ("downlink", "none"), ("dp_clip", 0.0), ("dp_epsilon", 0.0), ("secure_agg", False),
           ("prune", 0.0), ("quantize", "none")]
  return [f"--{f}={getattr(cfg, f)}" for f, off in flags if getattr(cfg, f, off) != off]


def validate_algorithm(cfg, has_batch_norm: bool) -> None:
  """Checks the algorithm flags (ConfigError naming the flag)."""
  a = cfg.algorithm
  check(a in ALGORITHMS, f"--algorithm={a!r} is unknown; choose one of {ALGORITHMS}.")
  defaults = AlgorithmFlags()
  for flag, owner in _HYPER.items():
    check(a == owner or getattr(cfg, flag) == getattr(defaults, flag),
          f"--{flag}={getattr(cfg, flag)} is for --algorithm={owner} (got --algorithm={a}).")
  check(cfg.scaffold_option in ("I", "II"), f"--scaffold_option must be I or II, got {cfg.scaffold_option!r}.")
  check(cfg.prox_mu >= 0, f"--prox_mu must be >= 0, got {cfg.prox_mu}.")
  check(cfg.dyn_alpha >= 0, f"--dyn_alpha must be >= 0, got {cfg.dyn_alpha}.")
  check(cfg.ditto_lambda >= 0, f"--ditto_lambda must be >= 0, got {cfg.ditto_lambda}.")
  check(cfg.head_steps >= 0, f"--head_steps must be >= 0, got {cfg.head_steps}.")
  check(0 < cfg.personal_fraction < 1, f"--personal_fraction must be in (0, 1), got {cfg.personal_fraction}.")
  check(cfg.finetune_steps >= 0, f"--finetune_steps must be >= 0, got {cfg.finetune_steps}.")
  check(cfg.finetune_steps == 0 or cfg.personal_eval or a in PERSONALIZED,
        "--finetune_steps is for the personalized evaluation: add --personal_eval=true.")
  check(a != "scaffold" or cfg.scaffold_option == "I" or cfg.client_optimizer == "sgd",
        f"--algorithm=scaffold (option II) assumes plain SGD clients: use --client_optimizer=sgd "
        f"(got {cfg.client_optimizer}).")
  check(a != "fednova" or cfg.client_optimizer in ("sgd", "momentum"),
        f"--algorithm=fednova normalises SGD or momentum-SGD steps: use --client_optimizer=sgd or momentum "
        f"(got {cfg.client_optimizer}).")
  check(a != "fedbn" or has_batch_norm, "--algorithm=fedbn keeps BatchNorm layers local, but this model has no "
        "BatchNorm; use fedper or fedrep.")
  check(a != "fedbn" or getattr(cfg, "bn", "local") in ("average", "local"),
        f"--algorithm=fedbn keeps the BatchNorm statistics local: drop --bn={getattr(cfg, 'bn', '')}.")
  used = _transforms_in_use(cfg)
  if a in ("scaffold", "fednova"):
    private = [u for u in used if u.startswith(("--dp", "--secure"))]
    check(not private, f"--algorithm={a} sends an extra message averaged in the clear, which {private} would not "
          "cover; use it without DP or secure aggregation.")
  check(a != "ditto" or not used, f"--algorithm=ditto does not combine with {used} yet; run it without them.")


def algorithm_kwargs(cfg, local: LocalTraining) -> dict:
  """FedAvg's keyword arguments for ``--algorithm`` (all but Ditto, which is not a FedAvg)."""
  a = cfg.algorithm
  kw = {"local": local, "server_optimizer": optax.sgd(cfg.server_lr)}
  if a in SERVER_OPTIMIZERS and a != "fedavg":
    kw["server_optimizer"] = server_optimizer(a, cfg.server_lr)
  elif a == "fedprox":
    kw["local"] = fedprox(local, cfg.prox_mu)
  elif a == "scaffold":
    kw["hooks"] = Scaffold(cfg.client_lr, option=cfg.scaffold_option)
  elif a == "feddyn":
    kw["hooks"] = FedDyn(cfg.dyn_alpha)
  elif a == "fednova":
    kw["hooks"] = FedNova(momentum=0.9 if cfg.client_optimizer == "momentum" else 0.0)
  elif a == "fedper":
    kw["local_params"] = HEAD
  elif a == "fedrep":
    kw.update(local_params=HEAD, hooks=HeadThenBody(HEAD, cfg.head_steps))
  elif a == "fedbn":
    kw.update(local_params=BN_PARAMS, model_state="local")
  return kw


def make_algorithm(cfg, kwargs: dict, **fedavg_kwargs):
  """The algorithm: Ditto from the same local training, else FedAvg with ``kwargs`` (from
  :func:`algorithm_kwargs`, after the transform/compression set-up) and ``fedavg_kwargs``."""
  if cfg.algorithm == "ditto":
    extra = {k: v for k, v in fedavg_kwargs.items() if k in ("schedule", "trainable", "model_state")}
    return Ditto(kwargs["local"], cfg.ditto_lambda, server_optimizer=kwargs["server_optimizer"], **extra)
  merged = {**fedavg_kwargs, **kwargs}
  return FedAvg(**merged)


def client_models(state):
  """(params, model state) for every client's evaluation: its own model where the algorithm keeps one."""
  if hasattr(state, "personal_params"):  # Ditto
    ms = state.personal.client_states if state.personal.client_states is not None else state.server.model_state
    return state.personal_params(), ms
  ms = state.client_states if state.client_states is not None else state.model_state
  return state.all_client_params(), ms


def personal_eval(cfg, model, local: LocalTraining, train, held, batch_size: int = 256):
  """``state -> {"personal_accuracy", "personal_accuracy_mean", "personal_accuracy_p10"}``: every client's
  model on its own held-out examples (``held``), after ``--finetune_steps`` local steps on ``train``."""

  def fn(state) -> dict:
    params, ms = client_models(state)
    out = evaluate_per_client(model, params, ms, held, finetune=cfg.finetune_steps, local=local, train=train,
                              batch_size=batch_size, chunk_size=None)
    acc = out["summary"]["accuracy"]
    return {"personal_accuracy": acc["weighted_mean"], "personal_accuracy_mean": acc["mean"],
            "personal_accuracy_p10": acc["p10"]}

  return fn
