"""Shared pieces of the worked tasks beyond images (``python -m fedjax_tl.experiments.diabetes`` and
``python -m fedjax_tl.experiments.text``; docs/tasks.md): the flags both have, their rules in the experiments'
flag table (:mod:`fedjax_tl.experiments.rules`, registered for these two entry points only), and per-client
evaluation summarised for the results file.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedjax_tl.experiments import rules
from fedjax_tl.experiments.rules import check, rule

__all__ = ["TASKS", "TaskFlags", "per_client_report"]

TASKS = ("diabetes", "text")  # the entry points these rules apply to (not in rules.ALL: other fields)


@dataclasses.dataclass(frozen=True)
class TaskFlags:
  """The flags of both worked tasks (each adds its own; see ``diabetes.Config`` and ``text.Config``)."""

  seed: int = 0
  num_clients: int = 8
  clients_per_round: int = 8
  rounds: int = 30
  batch_size: int = 16
  client_lr: float = 0.01
  client_optimizer: str = "adam"
  server_lr: float = 1.0  # plain FedAvg: the server adds the mean client delta
  test_fraction: float = 0.25  # each client holds out this fraction of its own examples
  hidden: int = 32
  schedule: str = "auto"
  workdir: str | None = None  # metrics (JSONL, CSV, TensorBoard), checkpoints and results.json go here
  resume: bool = False  # continue from the latest checkpoint in workdir
  checkpoint_every: int = 10
  keep_checkpoints: int = 2
  quiet: bool | None = None  # no progress bar; none = a bar when stderr is a terminal


# The shared rules of rules.py that read only fields both tasks have, registered for them as well.
rule("seed", bad=[["--seed=-1"]], experiments=TASKS)(rules.seed_non_negative)
rule("clients_per_round", "num_clients", bad=[["--clients_per_round=500"]], experiments=TASKS)(
    rules.cohort_within_population)
rule("client_lr", "server_lr", bad=[["--client_lr=0"], ["--server_lr=-1"], ["--client_lr=nan"]],
     experiments=TASKS)(rules.positive_rates)
rule("client_optimizer", bad=[["--client_optimizer=adamw"]], experiments=TASKS)(rules.known_client_optimizer)
rule("schedule", bad=[["--schedule=fast"]], experiments=TASKS)(rules.known_schedule)

_COUNTS = ("rounds", "num_clients", "clients_per_round", "local_epochs", "local_steps", "batch_size", "hidden",
           "checkpoint_every", "keep_checkpoints")


@rule(*_COUNTS, bad=[["--rounds=0"], ["--num_clients=0"], ["--batch_size=-1"], ["--hidden=0"],
                     ["--checkpoint_every=0"], ["--keep_checkpoints=0"]], experiments=TASKS)
def task_positive_counts(cfg):
  for name in _COUNTS:
    if hasattr(cfg, name):
      v = getattr(cfg, name)
      check(v >= 1, f"--{name} must be a positive integer, got {v}.")


@rule("test_fraction", bad=[["--test_fraction=0"], ["--test_fraction=1"], ["--test_fraction=nan"]],
      experiments=TASKS)
def task_test_fraction(cfg):
  f = cfg.test_fraction
  check(math.isfinite(f) and 0 < f < 1, f"--test_fraction must be in (0, 1) (each client's held-out share), "
        f"got {f}.")


def per_client_report(per: dict, metrics: tuple[str, ...]) -> dict:
  """``evaluate_per_client``'s output as JSON: each metric's values per client and its summary (weighted mean,
  mean, 10th percentile over clients)."""
  out = {"num_examples": [int(n) for n in per["num_examples"]]}
  for m in metrics:
    out[m] = [float(v) for v in np.asarray(per[m])]
    out[f"{m}_summary"] = per["summary"][m]
  return out
