"""Accuracy vs uplink megabytes under compression, and accuracy vs epsilon under DP-FedAvg, on the digits demo.

    python experiments/digits_transforms.py --out experiments/results/digits_transforms.json

Runs the default digits preset (pretrained and scratch arms, 10 rounds, 5 of 20 clients per round) with
--compress none / int8 / topk:0.01 (error feedback) and with --dp_clip=0.5 --dp_epsilon 1 / 4 / 8
(delta 1e-5; RDP accounting, and PLD for 1 and 8), the latter also with adaptive clipping from 0.5 towards the
median, and prints one table.
Any digits flag can be appended (e.g. --rounds=20), and --only selects settings by prefix:

    python experiments/digits_transforms.py --only none,DP --num_clients=60 --partition=iid \
        --clients_per_round=30 --trainable=head --out experiments/results/digits_dp_60clients_head.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from fedjax_tl.experiments import digits
from fedjax_tl.experiments.common import format_table, parse_config

SETTINGS = [
    ("none", {}),
    ("int8", {"compress": "int8"}),
    ("qsgd:4", {"compress": "qsgd:4"}),
    ("topk:0.01 + EF", {"compress": "topk:0.01"}),
    ("topk:0.01 no EF", {"compress": "topk:0.01/noef"}),
    ("DP eps=1", {"dp_clip": 0.5, "dp_epsilon": 1.0}),
    ("DP eps=4", {"dp_clip": 0.5, "dp_epsilon": 4.0}),
    ("DP eps=8", {"dp_clip": 0.5, "dp_epsilon": 8.0}),
    ("DP eps=1 PLD", {"dp_clip": 0.5, "dp_epsilon": 1.0, "dp_accountant": "pld"}),
    ("DP eps=8 PLD", {"dp_clip": 0.5, "dp_epsilon": 8.0, "dp_accountant": "pld"}),
    ("adaptive DP eps=8", {"dp_clip": 0.5, "dp_epsilon": 8.0, "dp_adaptive": True, "dp_count_stddev": 1.5}),
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  ap.add_argument("--only", default="", help="comma-separated prefixes of the settings to run (e.g. 'none,DP')")
  args, rest = ap.parse_known_args()
  base, _ = parse_config(digits.Config, digits.PRESETS, rest)
  rows = []
  prefixes = [p for p in args.only.split(",") if p]
  for name, overrides in SETTINGS:
    if prefixes and not any(name.startswith(p) for p in prefixes):
      continue
    # A count-noise std given on the command line wins over the setting's (adaptive clipping needs
    # 2 * count_stddev > the calibrated noise multiplier, which grows with the cohort and the rounds).
    if any(a.startswith("--dp_count_stddev") for a in rest):
      overrides = {k: v for k, v in overrides.items() if k != "dp_count_stddev"}
    cfg = dataclasses.replace(base, **overrides)
    lines = []
    s = digits.run(cfg, log=lines.append)
    eps = next((ln.split("epsilon ")[1].split(" ")[0] for ln in lines if ln.startswith("privacy spent")), "")
    rows.append({"setting": name, "pretrained_acc": s["final_test_accuracy"]["pretrained"],
                 "scratch_acc": next(v for k, v in s["final_test_accuracy"].items() if k.startswith("scratch")),
                 "mb_up_total": s["mb_up_total"],
                 "mb_down_total": s["mb_down_total"], "epsilon": eps, "seconds": s["seconds"]})
    print(f"{name}: {rows[-1]}", flush=True)
    if args.out:  # after every setting, so a later failure loses nothing
      os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
      with open(args.out, "w") as f:
        json.dump({"config": dataclasses.asdict(base), "rows": rows}, f, indent=1)
  cols = ["setting", "pretrained_acc", "scratch_acc", "mb_up_total", "mb_down_total", "epsilon", "seconds"]
  print(format_table(cols, [[r[c] for c in cols] for r in rows]))


if __name__ == "__main__":
  main()
