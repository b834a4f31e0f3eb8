"""One process of tests/test_distributed.py's multi-process runs (started by python -m fedjax_tl.launch)."""

import json
import sys

import fedjax_tl.distributed as dist

index, count = dist.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_tl.core.train import sample_clients  # noqa: E402

num_clients = int(sys.argv[1])
mine = dist.process_clients(num_clients)
# a per-process partial sum: this process's clients' ids and a float of each, summed across processes
partial = {"ids": np.bincount(mine, minlength=num_clients).astype(np.int32),
           "x": np.float32(np.sum(np.sqrt(mine + 1.0)))}
total = dist.allreduce_sum(partial)
cohort = sample_clients(jax.random.PRNGKey(7), num_clients, 3)  # every process draws the same cohort
dist.assert_same(cohort, "the cohort")
bad = None
try:
  dist.assert_same(np.array([index]), "the process index")  # differs: must raise on every process
except ValueError as e:
  bad = str(e)
print("RESULT " + json.dumps({"index": index, "count": count, "devices": jax.device_count(), "mine": mine.tolist(),
                              "ids": total["ids"].tolist(), "x": float(total["x"]), "cohort": cohort.tolist(),
                              "bad": bad}), flush=True)
