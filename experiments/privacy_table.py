"""DP-FedAvg and DP-FTRL side by side on the digits demo, each run audited with canaries: accuracy, the accountant's
epsilon and the audit's lower bound, over seeds.

    python experiments/privacy_table.py --out experiments/results/privacy_table.json

Built from the library (fedjax_tl.privacy) and the digits experiment's data and pretraining (imported, not
changed). Setting (flags below): the pretrained CNN (fresh head) fine-tuned, all of it (``--trainable``), by
``--num_clients`` IID clients, ``--rounds`` rounds, clip ``--clip``, delta 1e-5, targets ``--epsilons``. Every
setting runs twice: as deployed (``--plain_cohort`` clients per round; its accuracy and epsilon) and audited
(``--canaries`` canary clients join the population and the cohort grows to ``--cohort``, so about as many real
clients take part per round; its accuracy, epsilon and the audit's lower bound):

* DP-FedAvg: fixed-size cohorts drawn uniformly every round (replace-one, PLD accountant; noise calibrated to the
  target);
* DP-FTRL: no sampling; the N clients in b = N / cohort fixed groups, one group per round (cyclic: each client
  every b rounds), banded Toeplitz noise with b bands ("DP-FTRL") or a BLT ("DP-FTRL-BLT"), jax-privacy's
  optimum for the rounds and the schema, replace-one, noise calibrated to the target;
* no DP (uniform mean, no clip, no noise) as the reference, audited with canaries of norm ``--clip``.

The audit: ``--canaries`` canary clients (about half held in), score = cosine with the sum of the released
updates, jax-privacy's one-run bound at 95% confidence. Prints a markdown table (mean and standard deviation over
``--seeds``) and writes every run's numbers and privacy statement to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from fedjax_tl.aggregators import DPFedAvg, UniformMean
from fedjax_tl.core.client import LocalTraining, client_optimizer
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.data import partition
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.data.sources import load_digits, split_by_labels, train_test_split
from fedjax_tl.experiments import digits
from fedjax_tl.models import pretrained
from fedjax_tl.privacy import accounting
from fedjax_tl.privacy.audit import CanaryAudit
from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy, ParticipationSampler
from fedjax_tl.privacy.statement import privacy_statement

DELTA = 1e-5
_STRATEGIES: dict = {}  # (mechanism, rounds, min_sep) -> the optimised strategy, shared by the runs
MECHANISMS = ("DP-FedAvg", "DP-FTRL", "DP-FTRL-BLT")


def setup(args, seed: int):
  cfg = digits.Config(seed=seed, num_clients=args.num_clients, partition="iid", rounds=args.rounds)
  data = load_digits()
  source = split_by_labels(data, digits._ints(cfg.source_labels))  # noqa: SLF001 (read-only use)
  target = split_by_labels(data, digits._ints(cfg.target_labels))  # noqa: SLF001
  train, test = train_test_split(target, cfg.test_fraction, seed)
  parts = partition.make_partition("iid", train.y, args.num_clients, seed=seed, alpha=cfg.alpha,
                                   min_size=cfg.min_client_size)
  pre = digits.pretrain(cfg, source)
  model = digits.make_model(cfg, target.num_classes)
  fresh, state = model.init(jax.random.PRNGKey(seed + 1))
  params = pretrained.merge(fresh, pre["params"], dont_load=["^head/"])
  local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                        epochs=cfg.local_epochs)
  return FederatedData.from_partition(train, parts), test, model, params, state, local


def _mechanism(args, mechanism: str, target: float | None, n: int, m: int, seed: int):
  """(aggregator, sampler or None, noise multiplier) for ``n`` clients, ``m`` per round."""
  rounds = args.rounds
  if mechanism == "DP-FedAvg":
    z = accounting.calibrate_noise_multiplier(target, n, m, rounds, DELTA, "pld", "fixed")
    return DPFedAvg(args.clip, z, m), None, z
  if mechanism.startswith("DP-FTRL"):
    b = n // m
    key = (mechanism, rounds, b)
    if key not in _STRATEGIES:
      _STRATEGIES[key] = (MFStrategy.blt(rounds, min_sep=b) if mechanism.endswith("BLT") else
                          MFStrategy.banded(rounds, min(b, rounds)))
    agg = DPFTRL.calibrated(target, DELTA, clip=args.clip, strategy=_STRATEGIES[key], rounds=rounds,
                            population=n, min_sep=b)
    return agg, ParticipationSampler(n, b, seed=seed), agg.noise_multiplier  # cyclic: b groups, one per round
  return UniformMean(), None, 0.0


def one_run(args, mechanism: str, target: float | None, seed: int, parts) -> dict:
  """The setting without canaries (the deployed run: its accuracy) and audited (canaries added to the population,
  the cohort grown with them: accuracy, epsilon, the audit)."""
  data, test, model, params, state, local = parts
  trainable = None if args.trainable == "all" else args.trainable
  out = {"mechanism": mechanism, "target_epsilon": target, "seed": seed}
  t0 = time.perf_counter()
  # without canaries
  agg, sampler, z = _mechanism(args, mechanism, target, data.num_clients, args.plain_cohort, seed)
  algo = FedAvg(local, aggregator=agg, trainable=trainable)
  final, _ = run_rounds(algo, algo.init(params, state), data, rounds=args.rounds, cohort_size=args.plain_cohort,
                        seed=seed, sampler=sampler)
  out["accuracy"] = float(evaluate(model, final.full_params(), final.model_state, test.x, test.y)["accuracy"])
  out["noise_multiplier"] = z
  statement = privacy_statement(algo, population=data.num_clients, rounds=args.rounds, delta=DELTA, sampler=sampler,
                                has_model_state=bool(jax.tree.leaves(state)))
  out["epsilon"] = statement["epsilon"]
  # audited
  n = data.num_clients + args.canaries
  agg, sampler, z = _mechanism(args, mechanism, target, n, args.cohort, seed)
  audit = CanaryAudit(args.canaries, seed=seed, canary_norm=args.clip if mechanism == "no DP" else None)
  algo, audited_data = audit.attach(FedAvg(local, aggregator=agg, trainable=trainable), data)
  final, _ = run_rounds(algo, algo.init(params, state), audited_data, rounds=args.rounds, cohort_size=args.cohort,
                        seed=seed, sampler=sampler)
  result = audit.result(final, DELTA)
  statement = privacy_statement(algo, population=n, rounds=args.rounds, delta=DELTA, sampler=sampler, audit=result,
                                has_model_state=bool(jax.tree.leaves(state)))
  acc = float(evaluate(model, final.full_params(), final.model_state, test.x, test.y)["accuracy"])
  out.update(audited_accuracy=acc, audited_epsilon=statement["epsilon"], audited_noise_multiplier=z,
             epsilon_audit=result["epsilon_audit"], epsilon_audit_max=result["epsilon_audit_max"],
             audit_auroc=result["audit_auroc"], seconds=time.perf_counter() - t0, statement=statement)
  return out


def _ms(values) -> str:
  v = np.asarray(values, np.float64)
  if np.all(np.isinf(v)):
    return "inf"
  if len(v) > 1 and np.ptp(v) < 1e-9:
    return f"{v[0]:.3f}"
  return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--epsilons", default="1,4,8")
  ap.add_argument("--num_clients", type=int, default=60)
  ap.add_argument("--canaries", type=int, default=200)
  ap.add_argument("--plain_cohort", type=int, default=30, help="clients per round without canaries")
  ap.add_argument("--cohort", type=int, default=130, help="clients per round of the audited run (with canaries)")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--clip", type=float, default=0.5)
  ap.add_argument("--trainable", default="all", help='regex of the trained params (e.g. "^head/"), or "all"')
  ap.add_argument("--mechanisms", default=",".join(MECHANISMS))
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  epsilons = [float(e) for e in args.epsilons.split(",")]
  mechanisms = [m for m in args.mechanisms.split(",") if m]
  unknown = set(mechanisms) - set(MECHANISMS)
  if unknown:
    raise SystemExit(f"--mechanisms: unknown {sorted(unknown)}; choose from {MECHANISMS}.")
  t0 = time.perf_counter()
  runs = []
  for seed in seeds:
    parts = setup(args, seed)
    settings = [("no DP", None)] + [(mech, e) for e in epsilons for mech in mechanisms]
    for mech, eps in settings:
      run = one_run(args, mech, eps, seed, parts)
      runs.append(run)
      print(f"seed {seed} {mech} target {eps}: accuracy {run['accuracy']:.3f} (audited run "
            f"{run['audited_accuracy']:.3f}), epsilon {run['epsilon']:.3f} (audited {run['audited_epsilon']:.3f}), "
            f"z {run['noise_multiplier']:.3f}, audit {run['epsilon_audit']:.3f} (max {run['epsilon_audit_max']:.3f},"
            f" AUROC {run['audit_auroc']:.3f}), {run['seconds']:.1f}s", flush=True)
  header = ("| mechanism | target epsilon | test accuracy | accountant epsilon | noise multiplier | accuracy, audited "
            "run | audit lower bound (95%) | audit AUROC |\n|---|---:|---:|---:|---:|---:|---:|---:|")
  lines = [header]
  for mech, eps in [("no DP", None)] + [(m_, e) for e in epsilons for m_ in mechanisms]:
    rs = [r for r in runs if r["mechanism"] == mech and r["target_epsilon"] == eps]
    lines.append(f"| {mech} | {'-' if eps is None else f'{eps:g}'} | {_ms([r['accuracy'] for r in rs])} | "
                 f"{_ms([r['epsilon'] for r in rs])} | {_ms([r['noise_multiplier'] for r in rs])} | "
                 f"{_ms([r['audited_accuracy'] for r in rs])} | {_ms([r['epsilon_audit'] for r in rs])} | "
                 f"{_ms([r['audit_auroc'] for r in rs])} |")
  ceiling = runs[0]["epsilon_audit_max"]
  print("\n".join(lines))
  print(f"(the most the audit could show with {args.canaries} canaries: {ceiling:.3f}; "
        f"{time.perf_counter() - t0:.0f}s in all)")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "delta": DELTA, "runs": runs, "table": lines, "audit_ceiling": ceiling}, f,
                indent=1, default=float)


if __name__ == "__main__":
  main()
