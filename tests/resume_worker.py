"""A small federated run used by test_checkpoint.py in a subprocess (so it can be killed with SIGKILL).

    python tests/resume_worker.py WORKDIR ROUNDS EVERY KILL_AFTER RESUME [LR]

KILL_AFTER > 0 sends SIGKILL to itself right after that round's metrics and checkpoint (if due) are written.
Covers params, BatchNorm statistics kept per client (FedBN, for the whole population), per-client
error-feedback residuals of a top-k compressor (for the whole population) and a stateful server optimizer (Adam).
"""

import dataclasses
import os
import signal
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.data import partition
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.data.sources import load_digits
from fedjax_tl.experiments.common import run_in_workdir
from fedjax_tl.models.base import Model
from fedjax_tl.transforms import compression


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.BatchNorm(use_running_average=not train)(x, mask=None if mask is None else mask[:, None])
    return nn.Dense(10)(x)


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 3
  lr: float = 0.05
  rounds: int = 6
  resume: bool = False
  checkpoint_every: int = 1
  keep_checkpoints: int = 2
  quiet: bool = True
  workdir: str = ""


def build(cfg: Config):
  ds = load_digits()
  ds = ds.subset(np.arange(400))
  data = FederatedData.from_partition(ds, partition.dirichlet(ds.y, 8, 0.5, seed=0, min_size=5))
  model = Model(Net(), (8, 8, 1))
  params, state = model.init(jax.random.PRNGKey(0))
  algo = FedAvg(LocalTraining(model, optax.sgd(cfg.lr), 16, epochs=1), server_optimizer=optax.adam(0.1),
                schedule="sequential/host:2", model_state="local",
                client_transform=compression.error_feedback(compression.top_k(0.1)))
  return algo, algo.init(params, state, num_clients=data.num_clients), data


def main(workdir, rounds, every, kill_after, resume, lr="0.05"):
  cfg = Config(lr=float(lr), rounds=int(rounds), resume=resume == "1", checkpoint_every=int(every), workdir=workdir)
  algo, state, data = build(cfg)

  def on_round(rec, _):
    if rec["round"] == int(kill_after):
      os.kill(os.getpid(), signal.SIGKILL)

  test = load_digits().subset(np.arange(400, 600))
  eval_fn = lambda s: evaluate(algo.local.model, s.full_params(), s.model_state, test.x, test.y)
  run_in_workdir(cfg, algo, state, data, rounds=cfg.rounds, cohort_size=3, evaluate_fn=eval_fn,
                 workdir=workdir, log=print, on_round=on_round)
  print("finished")


if __name__ == "__main__":
  main(*sys.argv[1:])
