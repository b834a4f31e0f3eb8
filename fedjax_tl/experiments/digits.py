"""Offline federated transfer learning on scikit-learn's digits (real data, no download).

Source task: digits 0-4, a small CNN trained centrally. Target task: digits 5-9 split over non-IID
(Dirichlet) clients and fine-tuned with FedAvg, once from the pretrained backbone (fresh head) and once from
scratch, with the same rounds, clients, keys and seed. Prints a per-round table and the final accuracies.

    python -m fedjax_tl.experiments.digits                      # default preset, ~1 minute on 2 CPU cores
    python -m fedjax_tl.experiments.digits --trainable=head     # linear probe: only the head is trained/sent
    python -m fedjax_tl.experiments.digits --rounds=20 --alpha=0.1 --workdir=/tmp/digits
    python -m fedjax_tl.experiments.digits --dp_clip=0.5 --dp_epsilon=8    # DP-FedAvg, noise calibrated
    python -m fedjax_tl.experiments.digits --compress=topk:0.01            # top-k 1% + error feedback uplink
    python -m fedjax_tl.experiments.digits --secure_agg=true --secagg_dropout=0.2
    python -m fedjax_tl.experiments.digits --prune=0.9 --quantize=int8   # 90% sparse during FL, int8 at the end
    python -m fedjax_tl.experiments.digits --algorithm=fedadam --server_lr=0.01  # Reddi et al. 2021
    python -m fedjax_tl.experiments.digits --algorithm=fedprox --prox_mu=0.1     # Li et al. 2020
    python -m fedjax_tl.experiments.digits --algorithm=scaffold --alpha=0.1      # Karimireddy et al. 2020
    python -m fedjax_tl.experiments.digits --algorithm=ditto --ditto_lambda=0.1  # personalized accuracy too
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import ClassVar

import jax
import numpy as np
import optax

from fedjax_tl.compress.flags import CompressFlags, compress_report, compress_setup
from fedjax_tl.core.client import OPTIMIZERS, LocalTraining, client_optimizer  # noqa: F401 (re-exported)
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.data import partition
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.data.sources import load_digits, split_by_labels, train_test_split
from fedjax_tl.experiments.algorithms import (  # noqa: F401 (ALGORITHMS, algorithm_kwargs: digits.* for scripts)
  ALGORITHMS,
  PERSONALIZED,
  AlgorithmFlags,
  algorithm_kwargs,
  make_algorithm,
  personal_eval,
)
from fedjax_tl.experiments.common import (
  ConfigError,
  TransformFlags,
  cli_main,
  fedavg_kwargs,
  format_table,
  parse_config,  # noqa: F401 (digits.parse_config: used by scripts and tests)
  privacy_setup,
  run_in_workdir,
  transform_setup,
  write_results,
)
from fedjax_tl.experiments.common import validate as validate_config
from fedjax_tl.experiments.rules import check, check_regex, parse_ints, rule
from fedjax_tl.experiments.workdir import WorkdirStatus, finished
from fedjax_tl.models import pretrained
from fedjax_tl.models.base import Model
from fedjax_tl.models.cnn import CNN


@dataclasses.dataclass(frozen=True)
class Config(AlgorithmFlags, TransformFlags, CompressFlags):  # + algorithm and its flags; compress, dp_*, ...
  EXPERIMENT: ClassVar[str] = "digits"  # what a work directory records (fedjax_tl.experiments.workdir)
  seed: int = 0
  # source task (central pretraining)
  source_labels: str = "0,1,2,3,4"
  pretrain_epochs: int = 10
  pretrain_lr: float = 1e-3
  # target task (federated fine-tuning)
  target_labels: str = "5,6,7,8,9"
  test_fraction: float = 0.3
  num_clients: int = 20
  partition: str = "dirichlet"
  alpha: float = 0.3
  min_client_size: int = 8
  clients_per_round: int = 5
  rounds: int = 10
  local_epochs: int = 1
  batch_size: int = 16
  client_lr: float = 0.05
  client_optimizer: str = "sgd"
  server_lr: float = 1.0  # e.g. 0.01 for the adaptive algorithms
  trainable: str | None = None  # regex of trainable params, e.g. "head" (linear probe); None = all
  schedule: str = "auto"
  target_accuracy: float = 0.7  # reported: the first round each run reaches this test accuracy
  features: str = "16,32"
  hidden: int = 64
  workdir: str | None = None  # metrics (JSONL, CSV, TensorBoard), checkpoints and results.json go here
  resume: bool = False  # continue from the latest checkpoint in workdir
  checkpoint_every: int = 1
  keep_checkpoints: int = 3
  quiet: bool | None = None  # no progress bar; none = a bar when stderr is a terminal


PRESETS = {
    "default": Config(),
    "smoke": Config(pretrain_epochs=2, rounds=2, num_clients=6, clients_per_round=3),
}

NUM_DIGITS = 10
RUN_DIRS = ("pretrained", "scratch")  # under --workdir (which holds results.json): one run directory per init


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _labels(cfg: Config, flag: str) -> list[int]:
  labels = parse_ints(getattr(cfg, flag), flag)
  bad = [v for v in labels if not 0 <= v < NUM_DIGITS]
  check(not bad, f"--{flag}={getattr(cfg, flag)}: {bad} not digits; labels are 0..{NUM_DIGITS - 1}.")
  check(len(set(labels)) == len(labels), f"--{flag}={getattr(cfg, flag)} repeats a label.")
  check(len(labels) >= 2, f"--{flag}={getattr(cfg, flag)!r}: a classification task needs at least 2 labels.")
  return labels


# The demo's own rules in the experiments' flag table (fedjax_tl.experiments.rules).
@rule("source_labels", "target_labels", experiments=("digits",),
      bad=[["--target_labels=5,6,12"], ["--source_labels=0,1,10"], ["--target_labels=5,x"], ["--target_labels=5,5,6"],
           ["--source_labels=3"]])
def _digit_labels(cfg):
  _labels(cfg, "source_labels")
  _labels(cfg, "target_labels")


@rule("pretrain_epochs", "pretrain_lr", "test_fraction", "min_client_size", "target_accuracy", experiments=("digits",),
      bad=[["--pretrain_epochs=0"], ["--pretrain_lr=0"], ["--test_fraction=1"], ["--min_client_size=-1"],
           ["--target_accuracy=1.5"]])
def _digits_values(cfg):
  check(cfg.pretrain_epochs >= 1, f"--pretrain_epochs must be a positive integer, got {cfg.pretrain_epochs}.")
  check(cfg.pretrain_lr > 0, f"--pretrain_lr must be > 0, got {cfg.pretrain_lr}.")
  check(0 < cfg.test_fraction < 1, f"--test_fraction must be in (0, 1), got {cfg.test_fraction}.")
  check(cfg.min_client_size >= 0, f"--min_client_size must be >= 0, got {cfg.min_client_size}.")
  check(0 <= cfg.target_accuracy <= 1, f"--target_accuracy must be in [0, 1], got {cfg.target_accuracy}.")


@rule("features", "hidden", "trainable", experiments=("digits",),
      bad=[["--features=0,8"], ["--features=a"], ["--hidden=0"], ["--trainable=head("]])
def _digits_model(cfg):
  features = parse_ints(cfg.features, "features")
  check(bool(features) and min(features) >= 1, f"--features={cfg.features!r}: need positive channel counts.")
  check(cfg.hidden >= 1, f"--hidden must be a positive integer, got {cfg.hidden}.")
  check_regex(cfg.trainable, "trainable")


@rule("trainable", "features", "hidden", experiments=("digits",), bad=[["--trainable=nomatch"]])
def _trainable_matches(cfg):
  """The regex must select some parameter of the demo's CNN (an abstract init: nothing computed)."""
  if cfg.trainable is None:
    return
  from flax import traverse_util

  from fedjax_tl.models.base import init_shapes

  params, _ = init_shapes(make_model(cfg, len(_labels(cfg, "target_labels"))))
  paths = ["/".join(k) for k in traverse_util.flatten_dict(params)]
  check(any(re.search(cfg.trainable, p) for p in paths),
        f"--trainable={cfg.trainable!r} matches no parameter of the CNN; its paths are {paths} (e.g. --trainable=head "
        "for a linear probe).")


@rule("algorithm", experiments=("digits",), bad=[["--algorithm=fedbn"]])
def _digits_fedbn(cfg):
  check(cfg.algorithm != "fedbn", "--algorithm=fedbn keeps BatchNorm layers local, but the digits CNN has no "
        "BatchNorm; use fedper or fedrep.")


def validate(cfg: Config) -> WorkdirStatus:
  """Every flag checked before any data is loaded or trained on (the flag table of
  :mod:`fedjax_tl.experiments.rules`), then the work directory; raises ConfigError naming the flag."""
  return validate_config(cfg, "digits", RUN_DIRS)


def make_model(cfg: Config, num_classes: int) -> Model:
  return Model(CNN(num_classes=num_classes, features=tuple(_ints(cfg.features)), hidden=cfg.hidden,
                   representation=cfg.algorithm == "moon"), (8, 8, 1))


_PRETRAINED: dict = {}  # the pretraining's inputs -> its result, so that runs in one process (sweeps) share it


def pretrain(cfg: Config, source: Dataset) -> dict:
  """Central training on the source task: one 'client' holding all source data, one round of E epochs.
  Deterministic in the fields it reads, so a process that runs several configs pretrains once per distinct
  (seed, source_labels, pretrain_epochs, pretrain_lr, batch_size, features, hidden, schedule)."""
  key = (cfg.seed, cfg.source_labels, cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, cfg.features,
         cfg.hidden, cfg.schedule)
  if key not in _PRETRAINED:
    _PRETRAINED[key] = _pretrain(cfg, source)
  return _PRETRAINED[key]


def _pretrain(cfg: Config, source: Dataset) -> dict:
  model = make_model(cfg, source.num_classes)
  params, state = model.init(jax.random.PRNGKey(cfg.seed))
  data = FederatedData.from_partition(source, [np.arange(len(source))])
  algo = FedAvg(LocalTraining(model, optax.adam(cfg.pretrain_lr), cfg.batch_size, epochs=cfg.pretrain_epochs),
                schedule=cfg.schedule)
  server, _ = run_rounds(algo, algo.init(params, state), data, rounds=1, cohort_size=1, seed=cfg.seed)
  acc = evaluate(model, server.full_params(), server.model_state, source.x, source.y)["accuracy"]
  return {"params": server.full_params(), "train_accuracy": acc}


def run(cfg: Config, log=print) -> dict:
  status = validate(cfg)
  if status.action == "done":  # --resume=true of a run that already holds --rounds: report it, write nothing
    return finished(cfg, status, log)
  if status.note:
    log(f"note: {status.note}")
  t_start = time.perf_counter()
  digits = load_digits()
  source = split_by_labels(digits, _ints(cfg.source_labels))
  target = split_by_labels(digits, _ints(cfg.target_labels))
  train, test = train_test_split(target, cfg.test_fraction, cfg.seed)
  log(f"source task {cfg.source_labels}: {len(source)} examples; target task {cfg.target_labels}: "
      f"{len(train)} train / {len(test)} test over {cfg.num_clients} clients ({cfg.partition}, alpha={cfg.alpha})")

  try:  # before the pretraining, so that a split that cannot be made fails in seconds
    parts = partition.make_partition(cfg.partition, train.y, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha,
                                     min_size=cfg.min_client_size)
  except ValueError as e:
    raise ConfigError(f"--partition={cfg.partition}, --num_clients={cfg.num_clients}: {e}") from None
  pre = pretrain(cfg, source)
  log(f"pretrained on the source task: train accuracy {pre['train_accuracy']:.4f} "
      f"({time.perf_counter() - t_start:.1f}s)")

  data = FederatedData.from_partition(train, parts)
  personal = cfg.personal_eval or cfg.algorithm in PERSONALIZED
  held = None
  if personal:  # every client holds out part of its own examples for its personalized accuracy
    data, held = data.split_clients(cfg.personal_fraction, cfg.seed)
  model = make_model(cfg, target.num_classes)
  fresh, state = model.init(jax.random.PRNGKey(cfg.seed + 1))
  inits = {"pretrained": pretrained.merge(fresh, pre["params"], dont_load=["^head/"]), "scratch": fresh}
  if cfg.trainable is not None:
    inits.pop("scratch")  # a frozen random backbone is not a meaningful baseline for partial fine-tuning
    inits["scratch (all trainable)"] = fresh
  histories, finals = {}, {}
  privacy = privacy_setup(cfg, data.num_clients, log)
  dp_kwargs, dp_metrics = transform_setup(cfg, data.num_clients, log, privacy=privacy)
  compression, statements = {}, {}
  for name, params in inits.items():
    local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                          epochs=cfg.local_epochs)
    kwargs, pruning = compress_setup(cfg, {**algorithm_kwargs(cfg, local, data), **dp_kwargs}, log)
    params = pruning.prune(params) if pruning is not None else params
    algo = make_algorithm(cfg, fedavg_kwargs(kwargs), schedule=cfg.schedule,
                          trainable=None if name.startswith("scratch") else cfg.trainable)
    per_client = personal_eval(cfg, model, kwargs["local"], data, held) if personal else None

    def eval_fn(s, per_client=per_client):
      out = evaluate(model, s.full_params(), s.model_state, test.x, test.y)
      return out if per_client is None else {**out, **per_client(s)}

    workdir = os.path.join(cfg.workdir, name.split(" ")[0]) if cfg.workdir else None
    algo, run_data = privacy.attach(algo, data)  # with --dp_audit: the canary clients join the population
    server, hist = run_in_workdir(cfg, algo, algo.init(params, state, run_data.num_clients), run_data,
                                  rounds=cfg.rounds, cohort_size=cfg.clients_per_round, evaluate_fn=eval_fn,
                                  workdir=workdir, log=log, round_metrics=dp_metrics, sampler=privacy.sampler,
                                  state_metrics=privacy.state_metrics(cfg.rounds, cfg.dp_delta))
    histories[name], finals[name] = hist, hist[-1]["test_accuracy"]
    audit = {k: v for k, v in hist[-1].items() if k.startswith(("epsilon_audit", "audit_"))} or None
    statements[name] = privacy.statement(algo, cfg.rounds, cfg.dp_delta, bool(jax.tree.leaves(state)), audit)
    if cfg.quantize != "none" or cfg.prune > 0:
      compression[name] = compress_report(cfg, model, server.full_params(), server.model_state, test.x, test.y)

  names = list(histories)
  header = ["round"] + [f"{n} {m}" for n in names for m in ("train_loss", "test_acc")]
  rows = [[r + 1] + [v for n in names for v in (histories[n][r]["train_loss"], histories[n][r]["test_accuracy"])]
          for r in range(cfg.rounds)]
  log(format_table(header, rows))
  reach = {n: next((h["round"] for h in histories[n] if h["test_accuracy"] >= cfg.target_accuracy), None)
           for n in names}
  log(f"rounds to reach {cfg.target_accuracy:.0%} test accuracy: "
      + ", ".join(f"{n} {reach[n] if reach[n] else f'not within {cfg.rounds}'}" for n in names))
  last = histories[names[0]][-1]
  log("final test accuracy: " + ", ".join(f"{n} {finals[n]:.4f}" for n in names)
      + f"  (uplink per round {last['bytes_up'] / 1e6:.4f} MB, {last['mb_up_total']:.4f} MB in all; downlink "
      f"{last['mb_down_total']:.4f} MB in all; {time.perf_counter() - t_start:.1f}s)")
  personal_finals = {}
  if personal:
    personal_finals = {n: {k: histories[n][-1][f"test_personal_accuracy{k}"] for k in ("", "_mean", "_p10")}
                       for n in names}
    log(f"personalized accuracy ({cfg.algorithm}; clients' own held-out examples"
        + (f", after {cfg.finetune_steps} local steps" if cfg.finetune_steps else "") + "): "
        + ", ".join(f"{n} {v['']:.4f} (mean over clients {v['_mean']:.4f}, 10th percentile {v['_p10']:.4f})"
                    for n, v in personal_finals.items()))
  if dp_metrics is not None:
    log(f"privacy spent: epsilon {dp_metrics(cfg.rounds)['epsilon']:.3f} at delta {cfg.dp_delta}")
    if privacy.audit is not None:
      log("privacy audit (a lower bound on epsilon; the accountant's epsilon is the claim): " + ", ".join(
          f"{n} epsilon_audit {st['epsilon_audit']:.3f} (at most {st['epsilon_audit_max']:.3f} can be shown with "
          f"{cfg.dp_audit} canaries)" for n, st in statements.items()))
    log("privacy statement: " + statements[names[0]]["text"])
  if compression:
    rows = [{"run": n, **r} for n, rs in compression.items() for r in rs]
    log("compressed models:\n" + format_table(list(rows[0]), [list(r.values()) for r in rows]))
  summary = {"final_test_accuracy": finals, "source_train_accuracy": pre["train_accuracy"],
             "rounds_to_target": reach, "mb_up_total": last["mb_up_total"], "mb_down_total": last["mb_down_total"],
             "seconds": time.perf_counter() - t_start}
  last5 = lambda n, key: float(np.mean([h[key] for h in histories[n][-5:]]))  # noqa: E731 (noisy non-IID rounds)
  summary["last5_test_accuracy"] = {n: last5(n, "test_accuracy") for n in names}
  summary["privacy"] = statements
  if personal:
    summary["final_personal_accuracy"] = {n: {"weighted_mean": v[""], "mean": v["_mean"], "p10": v["_p10"]}
                                          for n, v in personal_finals.items()}
    summary["last5_personal_accuracy"] = {n: last5(n, "test_personal_accuracy") for n in names}
  if compression:
    summary["compression"] = compression
  write_results(cfg.workdir, cfg, histories, summary, log)
  return summary


def main(argv=None) -> None:
  """The command line: bad flags end with a usage error (exit 2) before anything is loaded."""
  cli_main(run, Config, PRESETS, argv, __doc__.splitlines()[0], validate)


if __name__ == "__main__":
  main(sys.argv[1:])
