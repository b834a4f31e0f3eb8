"""ResNet18 (CIFAR stem) in plain PyTorch and in JAX, each in a fresh process: start-up and steady speed.

A benchmark reference only (PyTorch is not a dependency of fedjax_tl): the same ResNet18 as
``benchmark.resnet18_model`` (3x3/1 stem conv with bias, BatchNorm eps 1.001e-5 and momentum 0.01 in PyTorch's
convention, basic blocks [2, 2, 2, 2], 1x1 projection shortcuts with BatchNorm, global average pool, Dense(10)),
SGD lr 0.01, cross-entropy, uint8 32x32x3 inputs scaled by 1/255, trained over the same 10 x 64 random examples at
the same batch. Three modes, each run as its own process by :func:`run_all` (``benchmark.py --workload torch``):

* ``torch``: a plain PyTorch CPU training loop (default threads: all cores), one epoch per "round";
* ``jax-central``: centralized JAX training of the model (``bench_schedules.bench_centralized``: plain optax);
* ``jax-fed``: the federated round (every client, one local epoch, ``FedAvg`` with the ``auto`` schedule).

Each reports the time from process start (the parent's clock just before it starts the process: interpreter,
imports, model build, compilation included) to the end of its first round/epoch, and steady examples/s over the
next ``--rounds`` rounds/epochs. The parameter counts of both models are printed so that it is the same model.

    python experiments/benchmark.py --workload torch --repeats 3 --torch_python /path/to/venv-with-torch/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CLIENTS, EXAMPLES, BATCH, LR = 10, 64, 32, 0.01


def _torch_run(rounds: int, batch: int) -> dict:
  import numpy as np
  import torch
  from torch import nn

  t_import = time.time()

  def conv_bn(cin, cout, k, s, pad):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, pad, bias=True), nn.BatchNorm2d(cout, eps=1.001e-5, momentum=0.01))

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1, self.c2 = conv_bn(cin, cout, 3, stride, 1), conv_bn(cout, cout, 3, 1, 1)
      self.short = conv_bn(cin, cout, 1, stride, 0) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
      return torch.relu(self.short(x) + self.c2(torch.relu(self.c1(x))))

  class ResNet18(nn.Module):
    def __init__(self, num_classes=10, width=64):
      super().__init__()
      self.stem = conv_bn(3, width, 3, 1, 1)
      layers, cin = [], width
      for i, n in enumerate((2, 2, 2, 2)):
        cout = width * 2**i
        for j in range(n):
          layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
          cin = cout
      self.layers = nn.Sequential(*layers)
      self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = self.layers(torch.relu(self.stem(x)))
      return self.head(x.mean(dim=(2, 3)))

  torch.manual_seed(0)
  model = ResNet18()
  opt = torch.optim.SGD(model.parameters(), lr=LR)
  rng = np.random.default_rng(0)
  n = CLIENTS * EXAMPLES
  x = torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
  y = torch.from_numpy(rng.integers(0, 10, n).astype(np.int64))
  model.train()

  def step(i):
    xb = x[i:i + batch].permute(0, 3, 1, 2).float() / 255.0
    loss = nn.functional.cross_entropy(model(xb), y[i:i + batch])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def epoch(start=0):
    for i in range(start, n - batch + 1, batch):
      step(i)

  step(0)
  t_step = time.time()
  epoch(start=batch)  # the rest of the first epoch
  t_first = time.time()
  t0 = time.perf_counter()
  for _ in range(rounds):
    epoch()
  dt = (time.perf_counter() - t0) / rounds
  return {"first_round_end": t_first, "first_step_end": t_step, "import_end": t_import,
          "examples_per_s": (n // batch) * batch / dt,
          "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
          "version": torch.__version__}


def _jax_run(mode: str, rounds: int, batch: int) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax
  from bench_schedules import bench_centralized, bench_federated, make_data
  from benchmark import resnet18_model

  t_import = time.time()
  data = make_data(CLIENTS, EXAMPLES)
  if mode == "jax-step":  # one jitted training step, as a user's first step would be
    import optax
    from bench_schedules import centralized_step

    from fedjax_tl.core.client import LocalTraining

    model = resnet18_model()
    params, state = model.init(jax.random.PRNGKey(0))
    opt = optax.sgd(LR)
    step = jax.jit(centralized_step(LocalTraining(model, opt, batch).train_model, state, opt))
    out = step(params, opt.init(params), data.x[:batch], data.y[:batch])
    jax.block_until_ready(out)
    return {"first_step_end": time.time(), "import_end": t_import, "version": jax.__version__,
            "params": sum(a.size for a in jax.tree.leaves(params))}
  if mode == "jax-central":
    r = bench_centralized(data, epochs=rounds, batch=batch, lr=LR, model=resnet18_model())
  else:
    r = bench_federated("auto", data, rounds, batch, LR, model=resnet18_model())
  params, _ = resnet18_model().init(jax.random.PRNGKey(0))
  return {"first_round_end": r["first_round_end"], "compile_and_first_round_s": r["first_round_s"],
          "examples_per_s": r["examples_per_s"], "import_end": t_import,
          "params": sum(a.size for a in jax.tree.leaves(params)),
          "schedule": r.get("resolved_schedule", r.get("loop")), "version": jax.__version__}


def run_one(mode: str, python: str, rounds: int, batch: int) -> dict:
  """One fresh process of ``mode``; ``first_round_s``: from just before the process starts to the end of its
  first round (interpreter, imports, data, model, compiling and the round itself)."""
  t_start = time.time()
  p = subprocess.run([python, os.path.abspath(__file__), "--mode", mode, "--rounds", str(rounds), "--batch",
                      str(batch)], capture_output=True, text=True, timeout=1800)
  if p.returncode != 0:
    raise RuntimeError(f"{mode} failed:\n{p.stderr[-3000:]}")
  r = json.loads(p.stdout.strip().splitlines()[-1])
  for k in ("first_round", "first_step"):
    if f"{k}_end" in r:
      r[f"{k}_s"] = r[f"{k}_end"] - t_start
  r["startup_import_s"] = r["import_end"] - t_start
  r["mode"] = mode
  return r


def run_all(repeats: int, rounds: int, batch: int, torch_python: str | None, log=print) -> list[dict]:
  """``repeats`` interleaved fresh-process runs of each mode; one row per mode with medians."""
  modes = [("jax-step", sys.executable), ("jax-central", sys.executable), ("jax-fed", sys.executable)]
  if torch_python:
    modes.insert(0, ("torch", torch_python))
  else:
    log("torch: skipped (give --torch_python, an interpreter with torch installed)")
  runs = {m: [] for m, _ in modes}
  for rep in range(repeats):
    for m, py in modes:
      r = run_one(m, py, rounds, batch)
      runs[m].append(r)
      log(f"  repeat {rep + 1} {m}: " + ", ".join(f"{k} {r[k]:.1f}" for k in ("first_step_s", "first_round_s",
                                                                             "examples_per_s") if k in r))
  rows = []
  for m, rs in runs.items():
    med = lambda k, rs=rs: statistics.median(r[k] for r in rs) if k in rs[0] else None  # noqa: E731
    rows.append({"workload": "torch", "mode": m, "model": "resnet18", "shape": f"{CLIENTS}x{EXAMPLES}",
                 "batch": batch, "examples_per_s": med("examples_per_s"), "first_step_s": med("first_step_s"),
                 "first_round_s": med("first_round_s"), "startup_import_s": med("startup_import_s"),
                 "params": rs[0]["params"], "version": rs[0]["version"], "threads": rs[0].get("threads"),
                 "schedule": rs[0].get("schedule"), "repeats": repeats, "runs": rs})
  if torch_python:
    t = rows[0]
    for row in rows[1:]:
      for k in ("examples_per_s", "first_step_s", "first_round_s"):
        if row[k] is not None:
          row[f"x_torch_{k}"] = row[k] / t[k]
    if len({r["params"] for r in rows}) != 1:
      raise RuntimeError(f"not the same model: parameter counts {[(r['mode'], r['params']) for r in rows]}")
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=["torch", "jax-step", "jax-central", "jax-fed"], required=True)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--batch", type=int, default=BATCH)
  args = p.parse_args(argv)
  r = _torch_run(args.rounds, args.batch) if args.mode == "torch" else _jax_run(args.mode, args.rounds, args.batch)
  print(json.dumps(r))


if __name__ == "__main__":
  main()
