"""Smaller models for constrained clients, measured: accuracy, size and latency of compressed digits models.

    python experiments/compress_report.py --out experiments/results/compress_report.json

The digits demo's federated transfer task (default preset: CNN pretrained on digits 0-4, 10 FedAvg rounds on
digits 5-9 over 20 Dirichlet(0.3) clients, 5 per round) trained once in float32 from the pretrained backbone,
then: int8 PTQ (weight-only and dynamic-range, qwix) of that model; int8 QAT (clients train the fake-quantized
model for the same 10 rounds, then dynamic PTQ); magnitude pruning of the float model to 50/80/90% (global,
kernels only) without fine-tuning, with ``--finetune_rounds`` federated rounds of fine-tuning under the fixed
mask (next to the float model trained for as many more rounds), and gradually during the 10 rounds (Zhu &
Gupta, rounds 0..5). Plus a ResNet50 (random weights, 224x224, batch 1) size and latency row per format.
Latency: median of jitted forward passes on this machine's default backend (digits: a batch of 256 test
images). Any digits flag can be appended (e.g. --rounds=20).

The cifar_mock section: the same float32 / int8 PTQ / int8 QAT / pruned 50/80/90% (without and with
``--cifar_finetune_rounds`` of fine-tuning) rows for the cifar10 experiment's ``smoke`` preset (tfds mock data,
2 rounds) with ``--model`` in ``--cifar_models`` (ResNetTiny, ResNet18). Mock images and labels are random, so
their accuracy means nothing; sizes and latency (a batch of 32 images) do. Only these rows:

    python experiments/compress_report.py --sections=cifar_mock \
        --out experiments/results/compress_report_cifar_mock.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.compress import quantize as quant
from fedjax_tl.compress.flags import accuracy, compress_setup
from fedjax_tl.compress.pruning import apply_mask, magnitude_mask
from fedjax_tl.compress.report import latency_ms, size_report
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.data import partition
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.data.sources import load_digits, split_by_labels, train_test_split
from fedjax_tl.experiments import cifar10, digits
from fedjax_tl.experiments.common import format_table, parse_config
from fedjax_tl.models import pretrained
from fedjax_tl.models.base import Model
from fedjax_tl.models.resnet import ClassifierHead, ResNet50
from fedjax_tl.tree import tree_bits

SPARSITIES = (0.5, 0.8, 0.9)


def federated(cfg, model, params, state, data, test, rounds):
  """FedAvg as the digits demo runs it, with ``cfg``'s --quantize/--prune; returns (params, state, (uplink MB,
  mean test accuracy of the global model over the last 3 rounds: this non-IID task's round-to-round noise))."""
  kwargs, fp = compress_setup(cfg, {
      "local": LocalTraining(model, digits.client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                             epochs=cfg.local_epochs),
      "server_optimizer": optax.sgd(cfg.server_lr)}, log=lambda *a: None)
  params = fp.prune(params) if fp is not None else params
  algo = FedAvg(schedule=cfg.schedule, **kwargs)
  eval_fn = lambda s: evaluate(model, s.full_params(), s.model_state, test.x, test.y)
  server, hist = run_rounds(algo, algo.init(params, state), data, rounds=rounds, cohort_size=cfg.clients_per_round,
                            seed=cfg.seed, evaluate_fn=eval_fn)
  last3 = float(np.mean([h["test_accuracy"] for h in hist[-3:]]))
  return server.full_params(), server.model_state, (hist[-1]["mb_up_total"], last3)


def row(name, model, params, state, test, batch, fl=(None, None), q=None, runs=20):
  mb_up, last3 = fl
  sizes = size_report(params)
  extra = tree_bits(state) // 8
  if q is None:
    fwd = jax.jit(lambda xb: model.apply(params, state, xb, train=False)[0])
    acc = accuracy(fwd, test.x, test.y) if test is not None else None
    dense, sparse = sizes["float32_bytes"] + extra, sizes["sparse_bytes"] + extra
    fmt = "float32 sparse COO" if sparse < dense else "float32"
  else:
    fwd = q.apply
    acc = accuracy(fwd, test.x, test.y) if test is not None else None
    dense, sparse = quant.quantized_bytes(q), sizes["sparse_int8_bytes"] + extra
    fmt = "int8 sparse COO" if sparse < dense else "int8 + f32 scales"
  best = min(dense, sparse)
  return {"model": name, "test_accuracy": acc, "sparsity": round(sizes["sparsity"], 4),
          "bytes": best, "format": fmt, "vs_float32": best / (sizes["float32_bytes"] + extra),
          "latency_ms": latency_ms(fwd, batch, runs=runs), "uplink_mb": mb_up,
          "fl_last3_accuracy": last3}


def digits_rows(cfg, finetune_rounds, log=print):
  t0 = time.perf_counter()
  all_digits = load_digits()
  source = split_by_labels(all_digits, digits._ints(cfg.source_labels))
  target = split_by_labels(all_digits, digits._ints(cfg.target_labels))
  train, test = train_test_split(target, cfg.test_fraction, cfg.seed)
  pre = digits.pretrain(cfg, source)
  parts = partition.make_partition(cfg.partition, train.y, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha,
                                   min_size=cfg.min_client_size)
  data = FederatedData.from_partition(train, parts)
  model = digits.make_model(cfg, target.num_classes)
  fresh, state = model.init(jax.random.PRNGKey(cfg.seed + 1))
  init = pretrained.merge(fresh, pre["params"], dont_load=["^head/"])
  batch = jnp.asarray(test.x[:256])
  rows = []

  def add(r):
    rows.append(r)
    log(f"{r['model']}: accuracy {r['test_accuracy']:.4f}, {r['bytes']} bytes ({r['format']}), "
        f"{r['latency_ms']:.2f} ms ({time.perf_counter() - t0:.0f}s)")

  compressed_rows(cfg, model, init, state, data, test, batch, finetune_rounds, add)
  return rows


def compressed_rows(cfg, model, init, state, data, test, batch, finetune_rounds, add, prefix="", gradual=True,
                    runs=20):
  """The float32 / int8 PTQ / int8 QAT / pruned (with and without fine-tuning, and ``gradual``-ly during FL)
  rows of one federated task, each passed to ``add``; names start with ``prefix``."""
  r = lambda name, *a, **k: add(row(prefix + name, model, *a, test, batch, runs=runs, **k))
  params, st, mb = federated(cfg, model, init, state, data, test, cfg.rounds)
  r("float32", params, st, fl=mb)
  for mode in quant.MODES:
    r(f"int8 PTQ {mode}", params, st, fl=(mb[0], None), q=quant.ptq(model, params, st, mode))
  qp, qs, qmb = federated(dataclasses.replace(cfg, quantize="int8_qat"), model, init, state, data, test, cfg.rounds)
  r("int8 QAT (dynamic PTQ after)", qp, qs, fl=qmb, q=quant.ptq(model, qp, qs, "dynamic"))
  fp_, fs_, fmb_ = federated(cfg, model, params, st, data, test, finetune_rounds)
  r(f"float32 + {finetune_rounds} FL rounds (reference for fine-tuning)", fp_, fs_, fl=(mb[0] + fmb_[0], fmb_[1]))
  for s in SPARSITIES:
    pruned = apply_mask(params, magnitude_mask(params, s))
    r(f"pruned {s:.0%}, no fine-tuning", pruned, st, fl=(mb[0], None))
    ft = dataclasses.replace(cfg, prune=s, prune_schedule="start")
    fp_params, fp_state, fmb = federated(ft, model, pruned, st, data, test, finetune_rounds)
    r(f"pruned {s:.0%}, + {finetune_rounds} FL rounds fine-tuning", fp_params, fp_state,
      fl=(mb[0] + fmb[0], fmb[1]))
    if gradual:
      gp, gs, gmb = federated(dataclasses.replace(cfg, prune=s, prune_schedule="poly"), model, init, state, data,
                              test, cfg.rounds)
      r(f"pruned {s:.0%} gradually during FL", gp, gs, fl=gmb)
      r(f"pruned {s:.0%} gradually during FL, int8", gp, gs, fl=(gmb[0], None), q=quant.ptq(model, gp, gs, "dynamic"))


def cifar_mock_rows(name, finetune_rounds, runs=20, log=print):
  """``compressed_rows`` of the cifar10 experiment's ``smoke`` preset (tfds mock data: random images and labels,
  so accuracy means nothing; sizes and latency do) with ``--model=name``; latency at batch 32."""
  cfg = dataclasses.replace(cifar10.PRESETS["smoke"], model=name)
  cifar10.validate(cfg)
  t0 = time.perf_counter()
  train, test = cifar10.load_data(cfg)
  model = cifar10.make_model(cfg, train.num_classes, train.x.shape[1:])
  init, state = cifar10.init_params(cfg, model, None)
  data = FederatedData.from_partition(train, partition.make_partition(cfg.partition, train.y, cfg.num_clients,
                                                                      seed=cfg.seed))
  rows = []

  def add(r):
    rows.append({**r, "mock_data": True})
    log(f"{r['model']}: {r['bytes']} bytes ({r['format']}), {r['latency_ms']:.2f} ms "
        f"({time.perf_counter() - t0:.0f}s)")

  compressed_rows(cfg, model, init, state, data, test, jnp.asarray(test.x[:32]), finetune_rounds, add,
                  prefix=f"{name} (mock CIFAR) ", gradual=False, runs=runs)
  return rows, cfg


def resnet50_rows(runs: int, log=print):
  model = Model(ClassifierHead(ResNet50(), num_classes=1000), (224, 224, 3))
  params, state = model.init(jax.random.PRNGKey(0))
  batch = jnp.zeros((1, 224, 224, 3), jnp.uint8) + 128
  rows = [row("ResNet50 float32 (random weights)", model, params, state, None, batch, runs=runs)]
  log(f"{rows[-1]}")
  rows.append(row("ResNet50 int8 dynamic", model, params, state, None, batch, runs=runs,
                  q=quant.ptq(model, params, state, "dynamic")))
  log(f"{rows[-1]}")
  pruned = apply_mask(params, magnitude_mask(params, 0.9))
  rows.append(row("ResNet50 pruned 90%", model, pruned, state, None, batch, runs=runs))
  log(f"{rows[-1]}")
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  ap.add_argument("--finetune_rounds", type=int, default=5)
  ap.add_argument("--resnet50_runs", type=int, default=5, help="timed ResNet50 calls (0: skip the ResNet50 rows)")
  ap.add_argument("--sections", default="digits,resnet50,cifar_mock", help="which of digits,resnet50,cifar_mock")
  ap.add_argument("--cifar_models", default="tiny,resnet18", help="cifar10 --model values for the cifar_mock rows")
  ap.add_argument("--cifar_finetune_rounds", type=int, default=2)
  args, rest = ap.parse_known_args()
  sections = set(args.sections.split(","))
  cfg, _ = parse_config(digits.Config, digits.PRESETS, rest)
  rows, meta = [], {"backend": jax.default_backend()}
  if "digits" in sections:
    rows += digits_rows(cfg, args.finetune_rounds)
    meta.update(config=dataclasses.asdict(cfg), finetune_rounds=args.finetune_rounds)
  if "resnet50" in sections and args.resnet50_runs:
    rows += resnet50_rows(args.resnet50_runs)
  if "cifar_mock" in sections:
    meta["cifar_mock"] = {"note": "tfds mock data (random images and labels): accuracy is meaningless, sizes and "
                                  "latency (batch 32) are not", "finetune_rounds": args.cifar_finetune_rounds}
    for name in args.cifar_models.split(","):
      r, ccfg = cifar_mock_rows(name, args.cifar_finetune_rounds)
      rows += r
      meta["cifar_mock"][f"config_{name}"] = dataclasses.asdict(ccfg)
  cols = ["model", "test_accuracy", "fl_last3_accuracy", "sparsity", "bytes", "format", "vs_float32", "latency_ms",
          "uplink_mb"]
  print(format_table(cols, [["-" if r[c] is None else r[c] for c in cols] for r in rows]))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({**meta, "rows": rows}, f, indent=1)
    print(f"written to {args.out}")


if __name__ == "__main__":
  main()
