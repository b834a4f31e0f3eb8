"""Non-IID comparison: every algorithm x Dirichlet alpha x seed on the offline digits task, one table + plots.

    python experiments/sweep_noniid.py --out experiments/results/noniid_sweep.json
    python experiments/sweep_noniid.py --algorithms=fedavg,scaffold --alphas=0.1 --seeds=0 --rounds=5   # a quick look

Each cell is the digits demo (``fedjax_tl.experiments.digits``: CNN pretrained centrally on digits 0-4, then
federated on digits 5-9 over 20 Dirichlet(alpha) clients of >= 4 examples, 5 per round, 20 rounds) from the
pretrained backbone and from
scratch, with ``--personal_eval=true`` (every client holds out 20% of its examples): global test accuracy of the
global model and personalized accuracy (each client's model on its own held-out examples; for the global
algorithms that is the global model, for ``fedavg+ft`` after 5 local fine-tuning steps). Hyper-parameters are
the experiments' defaults except the adaptive server optimizers' ``--server_lr=0.01`` (Reddi et al.'s range).
Cells are written to ``--out`` as they finish; a rerun skips the cells already there (resume after a stop).
The table (``--out`` with ``.md``) gives mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from fedjax_tl.experiments import digits

# name -> digits flags
ALGORITHMS = {
    "fedavg": dict(algorithm="fedavg"),
    "fedavgm": dict(algorithm="fedavgm"),
    "fedadam": dict(algorithm="fedadam", server_lr=0.01),
    "fedyogi": dict(algorithm="fedyogi", server_lr=0.01),
    "fedadagrad": dict(algorithm="fedadagrad", server_lr=0.01),
    "fedprox": dict(algorithm="fedprox"),
    "scaffold": dict(algorithm="scaffold"),
    "feddyn": dict(algorithm="feddyn"),
    "fednova": dict(algorithm="fednova"),
    "mimelite": dict(algorithm="mimelite"),
    "ifca": dict(algorithm="ifca"),
    "qffl": dict(algorithm="qffl"),
    "fedlc": dict(algorithm="fedlc"),
    "moon": dict(algorithm="moon"),
    "apfl": dict(algorithm="apfl"),
    "fedavg+ft": dict(algorithm="fedavg", finetune_steps=5),
    "fedper": dict(algorithm="fedper"),
    "fedrep": dict(algorithm="fedrep"),
    "ditto": dict(algorithm="ditto"),
}
PERSONAL = ("fedavg+ft", "fedper", "fedrep", "ditto", "apfl")
MIN_CLIENT_SIZE = 4  # the digits default (8) cannot be drawn at alpha=0.1 for every seed


def run_cell(name: str, alpha: float, seed: int, rounds: int) -> dict:
  cfg = dataclasses.replace(digits.PRESETS["default"], alpha=alpha, seed=seed, rounds=rounds, personal_eval=True,
                            min_client_size=MIN_CLIENT_SIZE, quiet=True, **ALGORITHMS[name])
  digits.validate(cfg)
  t = time.perf_counter()
  summary = digits.run(cfg, log=lambda *_: None)
  num_clients = cfg.num_clients
  return {"algorithm": name, "alpha": alpha, "seed": seed, "rounds": rounds,
          "test_accuracy": summary["final_test_accuracy"],
          "personal_accuracy": summary["final_personal_accuracy"],
          "last5_test_accuracy": summary["last5_test_accuracy"],
          "last5_personal_accuracy": summary["last5_personal_accuracy"],
          "rounds_to_target": summary["rounds_to_target"], "target_accuracy": cfg.target_accuracy,
          "mb_up_per_client": summary["mb_up_total"] / num_clients,
          "mb_down_per_client": summary["mb_down_total"] / num_clients,
          "seconds": time.perf_counter() - t}


def _ms(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.3f} +- {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def table(cells: list[dict]) -> str:
  """Markdown: one row per (algorithm, alpha, init), mean +- std over seeds."""
  lines = ["| algorithm | alpha | init | global test acc (final) | global, mean of last 5 rounds | personalized acc "
           "(final) | personalized, last 5 | personalized p10 | rounds to "
           f"{cells[0]['target_accuracy']:.0%} (reached/seeds) | MB up per client | seeds |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  keys = sorted({(c["algorithm"], c["alpha"]) for c in cells}, key=lambda k: (k[1], list(ALGORITHMS).index(k[0])))
  for name, alpha in keys:
    group = [c for c in cells if c["algorithm"] == name and c["alpha"] == alpha]
    for init in group[0]["test_accuracy"]:
      reach = [c["rounds_to_target"][init] for c in group if c["rounds_to_target"][init] is not None]
      rounds = f"{np.mean(reach):.1f} ({len(reach)}/{len(group)})" if reach else f"- (0/{len(group)})"
      lines.append(f"| {name} | {alpha} | {init} | {_ms([c['test_accuracy'][init] for c in group])} | "
                   f"{_ms([c['last5_test_accuracy'][init] for c in group])} | "
                   f"{_ms([c['personal_accuracy'][init]['weighted_mean'] for c in group])} | "
                   f"{_ms([c['last5_personal_accuracy'][init] for c in group])} | "
                   f"{_ms([c['personal_accuracy'][init]['p10'] for c in group])} | {rounds} | "
                   f"{np.mean([c['mb_up_per_client'] for c in group]):.3f} | {len(group)} |")
  return "\n".join(lines)


def plot(cells: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  alphas = sorted({c["alpha"] for c in cells})
  fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
  for ax, alpha in zip(axes[0], alphas):
    names = [n for n in ALGORITHMS if any(c["algorithm"] == n and c["alpha"] == alpha for c in cells)]
    for i, name in enumerate(names):
      group = [c for c in cells if c["algorithm"] == name and c["alpha"] == alpha]
      g = [c["last5_test_accuracy"]["pretrained"] for c in group]
      p = [c["last5_personal_accuracy"]["pretrained"] for c in group]
      ax.errorbar([i - 0.15], [np.mean(g)], [np.std(g)], fmt="o", color="C0", label="global" if i == 0 else None)
      ax.errorbar([i + 0.15], [np.mean(p)], [np.std(p)], fmt="s", color="C1",
                  label="personalized" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_title(f"digits 5-9, pretrained backbone, Dirichlet alpha={alpha}")
    ax.set_ylabel("accuracy, mean of last 5 rounds (+- std over seeds)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="experiments/results/noniid_sweep.json")
  p.add_argument("--algorithms", default=",".join(ALGORITHMS))
  p.add_argument("--alphas", default="0.1,0.5")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rounds", type=int, default=20)
  args = p.parse_args()
  names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
  unknown = [n for n in names if n not in ALGORITHMS]
  if unknown:
    p.error(f"--algorithms: unknown {unknown}; choose from {list(ALGORITHMS)}")
  cells = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      cells = json.load(f)["cells"]
  done = {(c["algorithm"], c["alpha"], c["seed"], c["rounds"]) for c in cells}
  for alpha in (float(a) for a in args.alphas.split(",")):
    for seed in (int(s) for s in args.seeds.split(",")):
      for name in names:
        if (name, alpha, seed, args.rounds) in done:
          continue
        cell = run_cell(name, alpha, seed, args.rounds)
        cells.append(cell)
        print(f"{name:10s} alpha={alpha} seed={seed}: global {cell['test_accuracy']} personal "
              f"{ {k: round(v['weighted_mean'], 4) for k, v in cell['personal_accuracy'].items()} } "
              f"({cell['seconds']:.0f}s)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
          json.dump({"command": "python experiments/sweep_noniid.py " + " ".join(
              f"--{k}={v}" for k, v in vars(args).items()), "cells": cells}, f, indent=1)
  md = table([c for c in cells if c["rounds"] == args.rounds])
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(md + "\n")
  plot([c for c in cells if c["rounds"] == args.rounds], os.path.splitext(args.out)[0] + ".png")
  print(md)


if __name__ == "__main__":
  main()
