"""Federated regression on scikit-learn's diabetes data (442 patients, 10 features; ships with scikit-learn).

Clients are natural non-IID groups: sex x age quantile (--num_clients=8: both sexes in each of 4 age quartiles),
as if each client were a clinic serving one demographic group, so the clients' feature and target distributions
differ (covariate and label shift). Each client holds out --test_fraction of its patients. An MLP is trained with
FedAvg for --rounds rounds (objectives.regression(): MSE), and the same MLP is trained centrally on the pooled
training examples with the same number of example-passes; both are reported against the mean predictor and
ordinary least squares, with test MSE and R^2 on all held-out patients and per client (evaluate_per_client).

    python -m fedjax_tl.experiments.diabetes                       # ~1 minute on 2 CPU cores
    python -m fedjax_tl.experiments.diabetes --rounds=60 --local_epochs=1 --client_lr=0.003
    python -m fedjax_tl.experiments.diabetes --num_clients=4 --workdir=/tmp/diabetes
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import objectives
from fedjax_tl.core.client import LocalTraining, client_optimizer
from fedjax_tl.core.evaluate import evaluate, evaluate_per_client
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.experiments.common import cli_main, format_table, run_in_workdir, write_results
from fedjax_tl.experiments.common import validate as validate_config
from fedjax_tl.experiments.rules import check, rule
from fedjax_tl.experiments.tasks import TaskFlags, per_client_report
from fedjax_tl.experiments.workdir import WorkdirStatus, finished
from fedjax_tl.models.base import Model

FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
MAX_AGE_BINS = 10


@dataclasses.dataclass(frozen=True)
class Config(TaskFlags):
  EXPERIMENT: ClassVar[str] = "diabetes"  # what a work directory records (fedjax_tl.experiments.workdir)
  num_clients: int = 8  # sex x (num_clients / 2) age quantiles: an even number, 2 to 20
  clients_per_round: int = 8
  rounds: int = 30
  local_epochs: int = 1
  batch_size: int = 16
  client_lr: float = 0.01
  client_optimizer: str = "sgd"
  hidden: int = 16


PRESETS = {
    "default": Config(),
    "smoke": Config(rounds=4, num_clients=4, clients_per_round=4, hidden=8, client_lr=0.05),
}

RUN_DIRS = ("fedavg",)  # under --workdir (which holds results.json); the central reference is not checkpointed


@rule("num_clients", bad=[["--num_clients=7"], ["--num_clients=22"]], experiments=("diabetes",))
def _sex_by_age_groups(cfg):
  check(cfg.num_clients % 2 == 0 and 2 <= cfg.num_clients <= 2 * MAX_AGE_BINS,
        f"--num_clients={cfg.num_clients}: the clients are sex x age quantile groups, so an even number from 2 to "
        f"{2 * MAX_AGE_BINS} (e.g. 8: both sexes in 4 age quartiles).")


@rule("local_epochs", bad=[["--local_epochs=0"]], experiments=("diabetes",))
def _local_epochs(cfg):
  check(cfg.local_epochs >= 1, f"--local_epochs must be a positive integer, got {cfg.local_epochs}.")


def validate(cfg: Config) -> WorkdirStatus:
  """Every flag checked before any data is loaded or trained on; raises ConfigError naming the flag."""
  return validate_config(cfg, "diabetes", RUN_DIRS)


class MLP(nn.Module):
  """One ReLU layer and one real-valued output (a deeper or wider one overfits 331 patients within tens of
  epochs: see docs/tasks.md)."""

  hidden: int = 16

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(self.hidden)(x)))


def make_model(cfg: Config) -> Model:
  return Model(MLP(cfg.hidden), (len(FEATURES),), sample_dtype=jnp.float32)


def load_clients(cfg: Config) -> dict:
  """The raw data and its clients: ``x`` [442, 10] (unscaled), ``y`` [442], ``parts`` (index lists: client
  ``2 * a + s`` holds sex ``s`` in age quantile ``a``) and a description of each client."""
  from sklearn.datasets import load_diabetes

  raw = load_diabetes(scaled=False)
  x, y = raw.data.astype(np.float64), raw.target.astype(np.float64)
  bins = cfg.num_clients // 2
  age, sex = x[:, 0], x[:, 1]
  edges = np.quantile(age, np.linspace(0, 1, bins + 1))
  age_bin = np.clip(np.searchsorted(edges, age, side="right") - 1, 0, bins - 1)
  sexes = np.unique(sex)  # 1 and 2 in the unscaled data
  parts, groups = [], []
  for a in range(bins):
    for s_id, s in enumerate(sexes):
      idx = np.flatnonzero((age_bin == a) & (sex == s))
      parts.append(idx)
      groups.append({"sex": int(s), "age": [float(age[idx].min()), float(age[idx].max())] if len(idx) else None,
                     "sex_index": s_id})
  return {"x": x, "y": y, "parts": parts, "groups": groups}


def split_clients(parts: list, test_fraction: float, seed: int) -> tuple[list, list]:
  """Each client's own held-out examples (as ``FederatedData.split_clients``: client ``c`` shuffled with
  ``default_rng([seed, c])``, ``round(test_fraction * n)`` clipped to [1, n - 1] held out)."""
  train, test = [], []
  for c, idx in enumerate(parts):
    perm = np.random.default_rng([seed, c]).permutation(idx)
    k = int(np.clip(round(test_fraction * len(idx)), 1, max(len(idx) - 1, 1))) if len(idx) >= 2 else 0
    test.append(np.sort(perm[:k]))
    train.append(np.sort(perm[k:]))
  return train, test


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict:
  """MSE and R^2 (against ``y``'s own mean) of predictions, in numpy."""
  err = pred - y
  sst = float(((y - y.mean()) ** 2).sum())
  return {"mse": float((err**2).mean()), "r2": 1.0 - float((err**2).sum()) / max(sst, 1e-12)}


def _per_client_numpy(pred: np.ndarray, y: np.ndarray, parts: list, sd: float) -> dict:
  per = [regression_metrics(pred[i], y[i]) for i in parts]
  n = np.array([len(i) for i in parts])
  out = {"num_examples": n.tolist()}
  for m in ("mse", "r2"):
    v = np.array([p[m] * (sd**2 if m == "mse" else 1.0) for p in per])
    out[m] = v.tolist()
    out[f"{m}_summary"] = {"weighted_mean": float(np.average(v, weights=n)), "mean": float(v.mean()),
                           "p10": float(np.percentile(v, 10))}
  return out


def run(cfg: Config, log=print) -> dict:
  status = validate(cfg)
  if status.action == "done":
    return finished(cfg, status, log)
  if status.note:
    log(f"note: {status.note}")
  t_start = time.perf_counter()
  d = load_clients(cfg)
  train_parts, test_parts = split_clients(d["parts"], cfg.test_fraction, cfg.seed)
  tr_all, te_all = np.concatenate(train_parts), np.concatenate(test_parts)
  # Standardised with the training examples' mean and standard deviation (in a federation: one secure sum of each
  # client's sums and sums of squares); R^2 is unchanged by it, MSE is reported in the target's own units.
  mu_x, sd_x = d["x"][tr_all].mean(0), d["x"][tr_all].std(0)
  mu_y, sd_y = float(d["y"][tr_all].mean()), float(d["y"][tr_all].std())
  x = ((d["x"] - mu_x) / sd_x).astype(np.float32)
  y = ((d["y"] - mu_y) / sd_y).astype(np.float32)
  ds = Dataset(x, y, None)
  train = FederatedData.from_partition(ds, train_parts)
  test = FederatedData.from_partition(ds, test_parts)
  sizes = [(len(a), len(b)) for a, b in zip(train_parts, test_parts, strict=True)]
  log(f"diabetes: {len(tr_all)} train / {len(te_all)} test patients over {cfg.num_clients} clients (sex x "
      f"{cfg.num_clients // 2} age quantiles); train/test per client: " + " ".join(f"{a}/{b}" for a, b in sizes))

  model = make_model(cfg)
  objective = objectives.regression()
  params0, state0 = model.init(jax.random.PRNGKey(cfg.seed))
  to_units = lambda m: {"mse": float(m["mse"]) * sd_y**2, "r2": float(m["r2"])}  # noqa: E731

  def test_metrics(params, state):
    return evaluate(model, params, state, x[te_all], y[te_all], objective=objective)

  def per_client(params, state):
    per = evaluate_per_client(model, params, state, test, objective=objective)
    out = per_client_report(per, ("mse", "r2"))
    out["mse"] = [v * sd_y**2 for v in out["mse"]]
    out["mse_summary"] = {k: v * sd_y**2 for k, v in out["mse_summary"].items()}
    return out

  # FedAvg
  local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                        epochs=cfg.local_epochs, objective=objective)
  import optax

  algo = FedAvg(local, server_optimizer=optax.sgd(cfg.server_lr), schedule=cfg.schedule)
  workdir = os.path.join(cfg.workdir, RUN_DIRS[0]) if cfg.workdir else None
  server, hist = run_in_workdir(cfg, algo, algo.init(params0, state0), train, rounds=cfg.rounds,
                                cohort_size=cfg.clients_per_round, evaluate_fn=lambda s: test_metrics(
                                    s.full_params(), s.model_state), workdir=workdir, log=log)
  t_fed = time.perf_counter() - t_start
  for h in hist:  # the target's own units in the records (the training loss stays standardised)
    h["test_mse_units"] = float(h["test_mse"]) * sd_y**2

  # Centralized reference: the same model, optimizer and batch size on the pooled training examples, for the same
  # number of example-passes as FedAvg's local training (rounds x local epochs x the cohort's share of clients).
  epochs = max(1, round(cfg.rounds * cfg.local_epochs * cfg.clients_per_round / cfg.num_clients))
  pooled = FederatedData.from_partition(ds, [tr_all])
  central_algo = FedAvg(LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                                      epochs=epochs, objective=objective), schedule=cfg.schedule)
  central, _ = run_rounds(central_algo, central_algo.init(params0, state0), pooled, rounds=1, cohort_size=1,
                          seed=cfg.seed)

  # Classical references in numpy: the training mean, and ordinary least squares with an intercept.
  design = lambda a: np.concatenate([a, np.ones((len(a), 1), np.float32)], 1).astype(np.float64)  # noqa: E731
  coef, *_ = np.linalg.lstsq(design(x[tr_all]), y[tr_all].astype(np.float64), rcond=None)
  preds = {"mean_predictor": np.zeros(len(x)), "least_squares": design(x) @ coef}

  test_y = y[te_all].astype(np.float64)
  results = {"fedavg": to_units(test_metrics(server.full_params(), server.model_state)),
             "centralized": to_units(test_metrics(central.full_params(), central.model_state))}
  for name, p in preds.items():
    m = regression_metrics(p[te_all], test_y)
    results[name] = {"mse": m["mse"] * sd_y**2, "r2": m["r2"]}
  per = {"fedavg": per_client(server.full_params(), server.model_state),
         "centralized": per_client(central.full_params(), central.model_state)}
  for name, p in preds.items():
    per[name] = _per_client_numpy(p.astype(np.float64), y.astype(np.float64), test_parts, sd_y)

  every = max(1, cfg.rounds // 10)
  rows = [[h["round"], h["train_loss"], h["test_mse_units"], h["test_r2"]] for h in hist
          if h["round"] % every == 0 or h["round"] == cfg.rounds]
  log(format_table(["round", "train_loss (std units)", "test_mse", "test_r2"], rows))
  header = ["model", "test MSE", "test R^2", "per-client MSE (mean)", "per-client R^2 (mean)",
            "per-client R^2 (p10)"]
  table = [[n, r["mse"], r["r2"], per[n]["mse_summary"]["mean"], per[n]["r2_summary"]["mean"],
            per[n]["r2_summary"]["p10"]] for n, r in results.items()]
  log(format_table(header, table))
  log(f"example-passes: FedAvg {cfg.rounds} rounds x {cfg.local_epochs} local epochs x {cfg.clients_per_round}/"
      f"{cfg.num_clients} clients, centralized {epochs} epochs; {time.perf_counter() - t_start:.1f}s "
      f"(FedAvg {t_fed:.1f}s)")
  summary = {"test": results, "per_client": per, "central_epochs": epochs,
             "clients": [{**g, "train": a, "test": b} for g, (a, b) in zip(d["groups"], sizes, strict=True)],
             "target_mean": mu_y, "target_std": sd_y, "seconds": time.perf_counter() - t_start}
  write_results(cfg.workdir, cfg, hist, summary, log)
  return summary


def main(argv=None) -> None:
  """The command line: bad flags end with a usage error (exit 2) before anything is loaded."""
  cli_main(run, Config, PRESETS, argv, __doc__.splitlines()[0], validate)


if __name__ == "__main__":
  main(sys.argv[1:])
