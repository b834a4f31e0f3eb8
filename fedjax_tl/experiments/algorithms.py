"""The experiments' ``--algorithm`` flag and its hyper-parameters, shared by digits and cifar10.

    --algorithm=fedavg | fedavgm | fedadagrad | fedadam | fedyogi      server optimizer at --server_lr
              | fedprox (--prox_mu) | scaffold (--scaffold_option) | feddyn (--dyn_alpha) | fednova
              | mimelite (--mime_beta) | ifca (--ifca_models) | qffl (--qffl_q) | fedlc (--fedlc_tau)
              | moon (--moon_mu; the model returns its representation) | apfl (--apfl_alpha)   personalization
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

from fedjax_tl.algorithms.apfl import APFL, personal_models
from fedjax_tl.algorithms.ditto import Ditto
from fedjax_tl.algorithms.feddyn import FedDyn
from fedjax_tl.algorithms.fedlc import FedLC
from fedjax_tl.algorithms.fednova import FedNova
from fedjax_tl.algorithms.fedopt import SERVER_OPTIMIZERS, server_optimizer
from fedjax_tl.algorithms.fedprox import fedprox
from fedjax_tl.algorithms.ifca import IFCA
from fedjax_tl.algorithms.mimelite import MimeLite
from fedjax_tl.algorithms.moon import MOON
from fedjax_tl.algorithms.personal import BN_PARAMS, HeadThenBody
from fedjax_tl.algorithms.qffl import QFFL
from fedjax_tl.algorithms.scaffold import Scaffold
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate_per_client
from fedjax_tl.core.fedavg import FedAvg

__all__ = ["AlgorithmFlags", "ALGORITHMS", "PERSONALIZED", "algorithm_kwargs",
           "make_algorithm", "personal_eval"]

GLOBAL = (*SERVER_OPTIMIZERS, "fedprox", "scaffold", "feddyn", "fednova", "mimelite", "ifca", "qffl", "fedlc", "moon")
PERSONALIZED = ("fedper", "fedrep", "fedbn", "ditto", "apfl")
ALGORITHMS = GLOBAL + PERSONALIZED
HEAD = "^head"  # the experiments' models name their classifier layers "head" (and "head_hidden<i>")


@dataclasses.dataclass(frozen=True)
class AlgorithmFlags:
  """Algorithm fields shared by the experiments' configs (checked by the flag table,
  :mod:`fedjax_tl.experiments.rules`)."""

  algorithm: str = "fedavg"  # one of ALGORITHMS
  prox_mu: float = 0.01  # FedProx's proximal strength (--algorithm=fedprox)
  scaffold_option: str = "II"  # SCAFFOLD's control-variate update: II (from the model change) or I (a gradient)
  dyn_alpha: float = 0.01  # FedDyn's regularisation strength alpha (--algorithm=feddyn)
  head_steps: int = 5  # FedRep: local steps on the personal head before the body's steps (--algorithm=fedrep)
  ditto_lambda: float = 0.1  # Ditto's pull of the personal models to the global one (--algorithm=ditto)
  mime_beta: float = 0.9  # MimeLite's server momentum, applied in every local step (--algorithm=mimelite)
  ifca_models: int = 2  # IFCA's number of cluster models (--algorithm=ifca)
  qffl_q: float = 1.0  # q-FFL's fairness exponent q (--algorithm=qffl; 0: uniform average)
  fedlc_tau: float = 1.0  # FedLC's logit-calibration strength tau (--algorithm=fedlc)
  moon_mu: float = 1.0  # MOON's model-contrastive loss weight mu (--algorithm=moon)
  apfl_alpha: float = 0.25  # APFL's mixing weight of the personal model (--algorithm=apfl)
  personal_eval: bool = False  # each client's accuracy on its own held-out examples (on for personalized ones)
  personal_fraction: float = 0.2  # share of every client's examples held out for --personal_eval
  finetune_steps: int = 0  # personalized evaluation after this many local steps from the evaluated model


def algorithm_kwargs(cfg, local: LocalTraining, data=None) -> dict:
  """FedAvg's keyword arguments for ``--algorithm`` (all but Ditto, which is not a FedAvg); FedLC needs the
  training ``data`` (its clients' label counts)."""
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
  elif a == "mimelite":
    kw["hooks"] = MimeLite(cfg.mime_beta)
  elif a == "ifca":
    kw["hooks"] = IFCA(cfg.ifca_models, seed=cfg.seed)
  elif a == "qffl":
    kw["hooks"] = QFFL(cfg.qffl_q, lr=cfg.client_lr)
  elif a == "fedlc":
    if data is None:
      raise ValueError("--algorithm=fedlc needs the training data's label counts: algorithm_kwargs(cfg, local, data).")
    kw["hooks"] = FedLC.for_data(data, cfg.fedlc_tau)
  elif a == "moon":
    kw["hooks"] = MOON(cfg.moon_mu)
  elif a == "apfl":
    kw["hooks"] = APFL(cfg.apfl_alpha, lr=cfg.client_lr)
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
    # the global model's aggregation and transforms (DP, secure aggregation, compression): the personal pass
    # sends nothing
    extra.update({k: kwargs[k] for k in ("aggregator", "client_transform", "server_transform", "downlink")
                  if k in kwargs})
    return Ditto(kwargs["local"], cfg.ditto_lambda, server_optimizer=kwargs["server_optimizer"], **extra)
  merged = {**fedavg_kwargs, **kwargs}
  return FedAvg(**merged)


def client_models(state):
  """(params, model state) for every client's evaluation: its own model where the algorithm keeps one."""
  rows = state.clients.get("algorithm") if isinstance(getattr(state, "clients", None), dict) else None
  if isinstance(rows, dict) and set(rows) == {"v", "alpha"}:  # APFL: each client's mixture of v and w
    return state.per_client_models(personal_models(state)), state.model_state
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
