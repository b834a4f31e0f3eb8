"""Will it fit on a Colab TPU? Plan the CIFAR-10 experiment's round for a TPU target, without a TPU.

Compiles the round of ``fedjax_tl.experiments.cifar10`` (any of its model flags: --model, --image_size, --dtype,
--strategy, --batch_size, --local_epochs, ...) for each cohort size with the real TPU compiler (libtpu:
``pip install -e ".[tpu]"``) and prints, per target and cohort size, the schedule (chunk size) that fits,
memory per device, FLOPs per round and the lower bound on round time at the chip's peak; --out writes JSON.

    python -m fedjax_tl.experiments.plan --target=v5e-1 --model=resnet50 --dtype=bfloat16 --cohorts=10,100,1000
    python -m fedjax_tl.experiments.plan --target=v5e-1,v5e-4 --image_size=224 --dtype=bfloat16 --out=plan.json
    python -m fedjax_tl.experiments.plan --target=host --memory_gib=2 --model=tiny --cohorts=16   # this machine

Targets: v2-8 (Colab "TPU v2"), v5e-1 (Colab "v5e-1 TPU"), v6e-1 (Colab "v6e-1 TPU"), v5e-4, v5e-8, v6e-4, v6e-8,
host. Clients hold --examples_per_client examples each (default 50: CIFAR-10 over 1000 clients), so with batch
32 and one local epoch each client runs 2 steps. Compiling ResNet50 takes about 1-2 minutes per program on 2 CPU
cores; a row needs 1 program when the whole cohort fits and 3-5 when it must be chunked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from fedjax_tl import plan
from fedjax_tl.algorithms.fedopt import SERVER_OPTIMIZERS
from fedjax_tl.core.client import LocalTraining, client_optimizer
from fedjax_tl.experiments import cifar10, rules
from fedjax_tl.experiments.common import ConfigError, check, format_table, parse_config, parse_ints
from fedjax_tl.experiments.rules import rule
from fedjax_tl.models import transfer


def _planner_args(parser):
  """The planner's own flags (next to cifar10's, in --help)."""
  parser.add_argument("--target", default="v5e-1", help="TPU target(s), comma-separated (default: v5e-1)")
  parser.add_argument("--cohorts", default="10,100,1000", help="clients per round to plan (default: 10,100,1000)")
  parser.add_argument("--examples_per_client", type=int, default=50, help="examples per client (default: 50)")
  parser.add_argument("--num_train", type=int, default=50000, help="training examples in all (default: 50000)")
  parser.add_argument("--hbm_fraction", type=float, default=0.9,
                      help="share of a chip's HBM a plan may use (default: 0.9)")
  parser.add_argument("--memory_gib", type=float, default=None, help="memory per device instead of the target's")
  parser.add_argument("--max_compiles", type=int, default=6, help="compiles allowed for the chunk search per row "
                      "(default: 6)")
  parser.add_argument("--out", default=None, help="JSON file for the rows (default: none)")


def run(args, cfg: cifar10.Config, log=print) -> list[dict]:
  model = cifar10.make_model(cfg, 10, (32, 32, 3))
  local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                        epochs=cfg.local_epochs)
  trainable = transfer.trainable_pattern(cfg.strategy)
  rows = []
  for name in args.target.split(","):
    for c in parse_ints(args.cohorts, "cohorts"):
      row = plan.plan_round(local, name, cohort_size=c, pad_size=args.examples_per_client, num_train=args.num_train,
                            trainable=trainable, schedule=cfg.schedule, hbm_fraction=args.hbm_fraction,
                            memory_bytes=int(args.memory_gib * plan.GiB) if args.memory_gib else None,
                            max_compiles=args.max_compiles, log=log)
      row.update(model=cfg.model, image_size=cfg.image_size, dtype=cfg.dtype, strategy=cfg.strategy)
      rows.append(row)
      if args.out:  # after every row: compiles are slow, keep what is done
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
          json.dump({"config": dataclasses.asdict(cfg), "planner": vars(args), "rows": rows}, f, indent=1)
  cols = ["target", "cohort", "schedule", "GiB/device", "% HBM", "fits", "TFLOP/round", "ms/round >=", "compile s"]
  table = [[r["target"], r["cohort"], r["schedule"],
            f"{r['bytes_per_device'] / plan.GiB:.2f}" if r["bytes_per_device"] else "OOM",
            f"{100 * r['hbm_fraction']:.0f}" if r["hbm_fraction"] else "", r["fits"],
            f"{r.get('flops_per_round', 0) / 1e12:.2f}", f"{r['min_round_ms']:.1f}" if r.get("min_round_ms") else "",
            f"{r.get('compile_s', 0):.0f}"] for r in rows]
  log(format_table(cols, table))
  return rows


def _check_planner(args) -> None:
  parse_ints(args.cohorts, "cohorts")
  check(all(c >= 1 for c in parse_ints(args.cohorts, "cohorts")), f"--cohorts={args.cohorts}: cohort sizes must be "
        "positive.")
  check(args.examples_per_client >= 1 and args.num_train >= args.examples_per_client,
        "--examples_per_client must be >= 1 and at most --num_train.")
  check(0 < args.hbm_fraction <= 1, f"--hbm_fraction must be in (0, 1], got {args.hbm_fraction}.")
  check(args.memory_gib is None or args.memory_gib > 0, f"--memory_gib must be > 0, got {args.memory_gib}.")
  check(args.max_compiles >= 1, f"--max_compiles must be >= 1, got {args.max_compiles}.")
  for name in args.target.split(","):
    try:
      plan.resolve_target(name)
    except plan.PlanError as e:
      raise ConfigError(f"--target: {e}") from None


@rule("bn", "algorithm", "strategy", "personal_eval", "finetune_steps", experiments=("plan",),
      bad=[["--bn=local"], ["--algorithm=scaffold"], ["--strategy=lora:4"], ["--personal_eval=true"]])
def _plannable(cfg):
  check(cfg.bn != "local", "--bn=local keeps a state per client of the population; plan with --bn=average.")
  check(cfg.algorithm in SERVER_OPTIMIZERS, f"The planner compiles FedAvg's local training (any server "
        f"optimizer: {sorted(SERVER_OPTIMIZERS)}); --algorithm={cfg.algorithm} changes the clients' program and "
        "is not planned yet.")
  check(not transfer.lora_rank(cfg.strategy), f"--strategy={cfg.strategy} is not planned yet (the planner "
        "builds the plain model); plan with full, head, bn+head or last:K.")
  check(not cfg.personal_eval and not cfg.finetune_steps, "--personal_eval/--finetune_steps are evaluation "
        "settings; the planner compiles the training round only.")


def main(argv=None) -> None:
  """The command line: cifar10's flags (the flag table's rules for "plan") and the planner's own; a bad one is a
  one-line usage error (exit 2) before anything compiles."""
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = "python -m fedjax_tl.experiments.plan"
  cfg, _, args = parse_config(cifar10.Config, cifar10.PRESETS, argv, __doc__.splitlines()[0],
                              validate=lambda c: (rules.validate(c, "plan"), _check_planner(pre_args(argv))),
                              add_arguments=_planner_args)
  try:
    run(args, cfg)
  except (ConfigError, plan.PlanError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def pre_args(argv):
  """The planner's flags alone (for the validation inside parse_config; unknown flags are left to it)."""
  pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  _planner_args(pre)
  return pre.parse_known_args(argv)[0]


if __name__ == "__main__":
  main()
