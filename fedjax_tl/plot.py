"""Plots of one or more runs from their work directories' metrics.jsonl.

    python -m fedjax_tl.plot WORKDIR [WORKDIR ...] [--out DIR]

Writes ``accuracy_vs_round.png``, ``accuracy_vs_megabytes.png`` (test accuracy against cumulative megabytes
communicated, up + down) and, when any run reports ``epsilon``, ``epsilon_vs_round.png``, overlaying the runs
(labelled by their directory names); a run's ``epsilon_audit`` (the canary audit's lower bound,
:mod:`fedjax_tl.privacy.audit`) is drawn on it as a marker at the round that reports it. The output directory
defaults to the first WORKDIR.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from fedjax_tl.metrics import read_jsonl

__all__ = ["plot_runs", "epsilon_series"]


def _load(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the work directory of a run?")
  rows = read_jsonl(path)
  if not rows:
    raise ValueError(f"{path} holds no rounds yet.")
  return rows


def plot_runs(workdirs: list[str], out_dir: str | None = None) -> list[str]:
  """Writes the PNGs and returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {os.path.basename(os.path.normpath(w)) or w: _load(w) for w in workdirs}
  out_dir = out_dir or workdirs[0]
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def figure(name, xlabel, ylabel, series):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (x, y, *style) in series.items():
      ax.plot(x, y, label=label, **(style[0] if style else {"marker": "o", "markersize": 3}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

  def evaluated(rows, key):
    return [r for r in rows if key in r]

  figure("accuracy_vs_round.png", "round", "test accuracy",
         {k: ([r["round"] for r in evaluated(v, "test_accuracy")],
              [r["test_accuracy"] for r in evaluated(v, "test_accuracy")]) for k, v in runs.items()})
  series = {}
  for k, v in runs.items():
    mb = np.cumsum([(r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6 for r in v])
    keep = [i for i, r in enumerate(v) if "test_accuracy" in r]
    series[k] = ([mb[i] for i in keep], [v[i]["test_accuracy"] for i in keep])
  figure("accuracy_vs_megabytes.png", "megabytes communicated (up + down, cumulative)", "test accuracy", series)
  key = "test_personal_accuracy"
  personal = {}
  for k, v in runs.items():
    rows = evaluated(v, key)
    if rows:
      personal[f"{k} global"] = ([r["round"] for r in rows], [r["test_accuracy"] for r in rows])
      personal[f"{k} personalized"] = ([r["round"] for r in rows], [r[key] for r in rows])
      personal[f"{k} personalized p10"] = ([r["round"] for r in rows], [r[f"{key}_p10"] for r in rows])
  if personal:  # runs with --personal_eval: each client's model on its own held-out examples
    figure("personalized_accuracy_vs_round.png", "round", "accuracy (global test set / clients' own held-out)",
           personal)
  eps = epsilon_series(runs)
  if eps:
    figure("epsilon_vs_round.png", "round", "epsilon (DP; markers: audited lower bound)", eps)
  return written


def epsilon_series(runs: dict[str, list[dict]]) -> dict:
  """The epsilon figure's series: each run's accountant ``epsilon`` per round, and its ``epsilon_audit`` (the
  canary audit's lower bound) as unconnected markers at the rounds that report one."""
  out = {}
  for k, rows in runs.items():
    eps = [r for r in rows if r.get("epsilon") is not None]
    if eps:
      out[k] = ([r["round"] for r in eps], [r["epsilon"] for r in eps])
    audit = [r for r in rows if r.get("epsilon_audit") is not None]
    if audit:
      out[f"{k} audit lower bound"] = ([r["round"] for r in audit], [r["epsilon_audit"] for r in audit],
                                       {"marker": "v", "markersize": 7, "linestyle": "none"})
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", default=None, help="output directory (default: the first workdir)")
  args = p.parse_args(argv)
  for path in plot_runs(args.workdirs, args.out):
    print(path)


if __name__ == "__main__":
  main(sys.argv[1:])
