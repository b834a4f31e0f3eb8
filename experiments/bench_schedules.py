"""Round throughput of every execution schedule vs centralized training of the same model.

Workload P of the performance issue: CIFAR-shaped uint8 32x32x3 inputs, CNN conv3x3(32)-relu-maxpool-
conv3x3(64)-relu-maxpool-dense(128)-relu-dense(10), batch 32, SGD, 1 local epoch, every client every round.

    python experiments/bench_schedules.py                                  # both shapes, all schedules
    python experiments/bench_schedules.py --shapes 10x500 --schedules vmap,sequential/host:8 --rounds 3

Prints a table (examples/s after warm-up, first-round seconds incl. compilation, ratio to centralized) and
writes it as JSON (default experiments/results/bench_schedules_<backend>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.core.client import LocalTraining, masked_cross_entropy
from fedjax_tl.core.execution import default_schedule
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.data import partition
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.experiments.common import format_table
from fedjax_tl.models.base import Model
from fedjax_tl.models.cnn import CNN

DEFAULT_SCHEDULES = ["sequential/host:8", "sequential/host:1", "sequential/scan:1", "sequential/scan:16",
                     "vmap/scan:1", "vmap/host:8", "chunked:10/host:8"]


def make_model(conv: str = "xla") -> Model:
  return Model(CNN(num_classes=10, features=(32, 64), hidden=128, conv=conv), (32, 32, 3))


def make_data(num_clients: int, per_client: int, seed: int = 0) -> FederatedData:
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  ds = Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32), 10)
  return FederatedData.from_partition(ds, partition.iid(n, num_clients, seed))


def bench_federated(schedule: str, data: FederatedData, rounds: int, batch: int, lr: float,
                    conv: str = "xla", model: Model | None = None, fast_path: bool = True) -> dict:
  model = model or make_model(conv)
  params, state = model.init(jax.random.PRNGKey(0))
  algo = FedAvg(LocalTraining(model, optax.sgd(lr), batch, epochs=1, fast_path=fast_path), schedule=schedule)
  s = algo.init(params, state)
  ids = np.arange(data.num_clients)
  t0 = time.perf_counter()
  s, m = algo.apply(s, data, ids, jax.random.PRNGKey(0))
  jax.block_until_ready(s.params)
  first, first_end = time.perf_counter() - t0, time.time()
  t0 = time.perf_counter()
  for r in range(rounds):
    s, m = algo.apply(s, data, ids, jax.random.PRNGKey(r + 1))
  jax.block_until_ready(s.params)
  dt = (time.perf_counter() - t0) / rounds
  n = float(m["num_examples"])
  return {"examples_per_s": n / dt, "rounds_per_s": 1 / dt, "first_round_s": first, "first_round_end": first_end,
          "resolved_schedule": str(algo.schedule)}


def centralized_step(model: Model, state, opt: optax.GradientTransformation):
  """One plain optimizer step on a full batch: (params, opt_state, x, y) -> (params, opt_state)."""

  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply(p, state, xb, train=True)
      return masked_cross_entropy(logits, yb, jnp.ones(yb.shape, bool))[0]
    u, opt_state = opt.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, u), opt_state

  return step


def bench_centralized(data: FederatedData, epochs: int, batch: int, lr: float, conv: str = "xla",
                      model: Model | None = None, loop: str | None = None, fast_path: bool = True) -> dict:
  """Plain optax training on device-resident, pre-shuffled data: ``loop="scan"`` runs an epoch as one
  ``lax.scan`` program, ``"host"`` one jitted step per batch. Default: the loop kind of the ``auto`` schedule
  for this model and backend, which is centralized training's faster form too (XLA:CPU runs convolutions in
  loop bodies slowly, everything else faster without per-step dispatch). ``fast_path``: train the model as
  federated training runs it (``LocalTraining.train_model``: on CPU the im2col/reshape-max rewrite)."""
  model = model or make_model(conv)
  params, state = model.init(jax.random.PRNGKey(0))
  opt = optax.sgd(lr)
  local = LocalTraining(model, opt, batch, fast_path=fast_path)
  step = centralized_step(local.train_model, state, opt)
  if loop is None:
    loop = default_schedule(local=local).loop
  n = (len(data.y) // batch) * batch
  x = jnp.asarray(data.x[:n].reshape(-1, batch, *data.x.shape[1:]))
  y = jnp.asarray(data.y[:n].reshape(-1, batch))
  if loop == "scan":
    scan_epoch = jax.jit(lambda p, o, xs, ys: jax.lax.scan(lambda c, b: (step(*c, *b), None), (p, o), (xs, ys))[0])
    run_epoch = lambda p, o: scan_epoch(p, o, x, y)  # noqa: E731
  else:
    step_jit = jax.jit(step)

    def run_epoch(p, o):
      for i in range(x.shape[0]):
        p, o = step_jit(p, o, x[i], y[i])
      return p, o

  opt_state = opt.init(params)
  t0 = time.perf_counter()
  params, opt_state = run_epoch(params, opt_state)  # compilation + one epoch
  jax.block_until_ready(params)
  first, first_end = time.perf_counter() - t0, time.time()
  t0 = time.perf_counter()
  for _ in range(epochs):
    params, opt_state = run_epoch(params, opt_state)
  jax.block_until_ready(params)
  dt = (time.perf_counter() - t0) / epochs
  return {"examples_per_s": n / dt, "rounds_per_s": 1 / dt, "first_round_s": first, "first_round_end": first_end,
          "loop": loop}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="10x500,100x64", help="comma-separated CLIENTSxEXAMPLES")
  p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES))
  p.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--conv", default="xla", choices=["xla", "im2col", "auto"], help="CNN convolution lowering")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  backend = jax.default_backend()
  results = {"backend": backend, "conv": args.conv, "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
             "machine": platform.machine(), "cpus": os.cpu_count(), "rows": []}
  for shape in args.shapes.split(","):
    c, e = (int(v) for v in shape.split("x"))
    data = make_data(c, e)
    central = bench_centralized(data, epochs=args.rounds, batch=args.batch, lr=args.lr, conv=args.conv)
    results["rows"].append({"shape": shape, "schedule": "centralized", **central, "ratio_to_centralized": 1.0})
    print(f"{shape} centralized: {central['examples_per_s']:.0f} ex/s", flush=True)
    for sched in args.schedules.split(","):
      r = bench_federated(sched, data, args.rounds, args.batch, args.lr, args.conv)
      r["ratio_to_centralized"] = r["examples_per_s"] / central["examples_per_s"]
      results["rows"].append({"shape": shape, "schedule": sched, **r})
      print(f"{shape} {sched}: {r['examples_per_s']:.0f} ex/s (first round {r['first_round_s']:.1f}s)", flush=True)
  header = ["shape", "schedule", "examples/s", "rounds/s", "first round s", "x centralized"]
  rows = [[r["shape"], r["schedule"], round(r["examples_per_s"]), r["rounds_per_s"], r["first_round_s"],
           r["ratio_to_centralized"]] for r in results["rows"]]
  print(f"\nbackend={backend} jax={jax.__version__} cpus={os.cpu_count()} conv={args.conv}")
  print(format_table(header, rows))
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"bench_schedules_{backend}{'' if args.conv == 'xla' else '_' + args.conv}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"written to {out}")


if __name__ == "__main__":
  main()
