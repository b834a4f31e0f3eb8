"""First-round time of a host-loop schedule whose clients all run fewer steps than its unrolled block.

Issue 11: ``auto`` on CPU is ``sequential/host:8`` for models with XLA convolutions; with 2 steps per client
the 8-step block never runs, and compiling it anyway made a ResNet18 first round 62.8 s vs 17.1 s for
``sequential/host:1``. Blocks are now compiled on first use. This script times the first round (and reports
run_rounds' ``compile_s`` and ``wall_s``) for ``auto`` and ``sequential/host:1`` on ResNetTiny, CIFAR-shaped
uint8 inputs, 4 clients of 16 examples, batch 8 (2 steps per client):

    PYTHONPATH=. python experiments/first_round_compile.py                 # both schedules, one line each
    PYTHONPATH=. python experiments/first_round_compile.py auto            # one schedule (a fresh process each
                                                                           # keeps the comparison fair)

Measured on the shared 2-core CPU (JAX 0.10.2, each schedule in a fresh process, two runs each), first round:
before (commit 4b34e9c) auto 134.0 / 124.4 s vs sequential/host:1 25.2 / 25.6 s; after, auto 25.2 / 26.4 s vs
sequential/host:1 26.2 / 32.9 s (the later rounds: 0.1-0.2 s either way).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
import optax

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import run_rounds
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.models import resnet
from fedjax_tl.models.base import Model


def main(schedules=("auto", "sequential/host:1"), clients: int = 4, per_client: int = 16, batch: int = 8):
  rng = np.random.default_rng(0)
  n = clients * per_client
  ds = Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32), 10)
  data = FederatedData.from_partition(ds, np.split(np.arange(n), clients))
  model = Model(resnet.ClassifierHead(resnet.ResNetTiny(), num_classes=10), (32, 32, 3))
  params, state = model.init(jax.random.PRNGKey(0))
  for spec in schedules:
    jax.clear_caches()
    algo = FedAvg(LocalTraining(model, optax.sgd(0.05), batch_size=batch, epochs=1), schedule=spec)
    s = algo.init(params, state)
    t0 = time.perf_counter()
    s, hist = run_rounds(algo, s, data, rounds=1, cohort_size=clients, seed=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_rounds(algo, s, data, rounds=1, cohort_size=clients, seed=0)
    second = time.perf_counter() - t0
    print(f"{spec:>18} ({algo.schedule}): first round {first:6.2f} s (compile_s {hist[0].get('compile_s', -1):6.2f},"
          f" wall_s {hist[0]['wall_s']:5.2f}); second round {second:5.2f} s", flush=True)


if __name__ == "__main__":
  main(tuple(sys.argv[1:]) or ("auto", "sequential/host:1"))
