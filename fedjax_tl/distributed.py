"""Several processes (hosts) on JAX's own multi-controller runtime: start-up, who holds which clients, and the
cross-process reductions a round needs.

    import fedjax_tl as ftl
    ftl.distributed.initialize()            # every process: JAX's runtime (TPU pod, SLURM, or our launcher's env)
    mine = ftl.distributed.process_clients(num_clients)   # the clients whose examples this process holds
    total = ftl.distributed.allreduce_sum(partial_sums)    # the same sum on every process

Start N local processes (tests, a workstation, CPU-only clusters) with the launcher, which sets the coordinator
address, the number of processes and each one's id, and uses the gloo CPU collectives:

    python -m fedjax_tl.launch --processes=2 -- python my_run.py

On a TPU pod slice run the same command on every worker (``gcloud compute tpus tpu-vm ssh NAME --worker=all
--command=...``); on a SLURM GPU cluster one task per process (``srun``): ``initialize()`` then lets JAX detect the
cluster itself. Nothing here is a scheduler or transport of our own: the coordination service and the collectives
are JAX's.

What is not yet built (issue 25): the federated round does not split its cohort across processes by itself; these
are the pieces it will be built from (each process trains its own clients, ``allreduce_sum`` adds the round's sums).
"""

from __future__ import annotations

import os

import jax
import numpy as np

__all__ = ["initialize", "is_initialized", "process_clients", "allreduce_sum", "assert_same", "ENV"]

# The launcher's environment variables (fedjax_tl.launch): coordinator "host:port", process count, process id.
ENV = ("FEDJAX_TL_COORDINATOR", "FEDJAX_TL_NUM_PROCESSES", "FEDJAX_TL_PROCESS_ID")

_STATE = {"initialized": False}


def is_initialized() -> bool:
  """Whether :func:`initialize` ran in this process."""
  return _STATE["initialized"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
  """Joins this process to the others (``jax.distributed.initialize``) and returns (process index, process count).

  With the arguments, or with the launcher's environment (:data:`ENV`), the processes meet at
  ``coordinator_address`` and, on CPU, use the gloo collectives (set before JAX's backend starts: call this before
  any other JAX work). Without either, JAX detects the cluster itself (TPU pod slices, SLURM, Open MPI). Calling
  it again is a no-op."""
  if _STATE["initialized"]:
    return jax.process_index(), jax.process_count()
  env = [os.environ.get(k) for k in ENV]
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and not all(v is not None for v in given):
    raise ValueError("initialize: give coordinator_address, num_processes and process_id together (or none of them "
                     "to let JAX detect the cluster).")
  if all(v is None for v in given) and any(env):
    if not all(env):
      missing = [k for k, v in zip(ENV, env) if not v]
      raise ValueError(f"initialize: the launcher's environment is incomplete ({', '.join(missing)} unset); start "
                       "the processes with python -m fedjax_tl.launch, or unset the others.")
    coordinator_address, num_processes, process_id = env[0], int(env[1]), int(env[2])
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"initialize: process_id must be in [0, {num_processes}), got {process_id}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's cross-process collectives
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  _STATE["initialized"] = True
  return jax.process_index(), jax.process_count()


def process_clients(num_clients: int, process_index: int | None = None, process_count: int | None = None
                    ) -> np.ndarray:
  """The client ids process ``process_index`` of ``process_count`` (default: this one, of all) holds: the
  population in contiguous blocks whose sizes differ by at most one. Every process computes every block the same
  way, so the blocks cover the population exactly once."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if num_clients < count:
    raise ValueError(f"process_clients: {num_clients} clients cannot be split over {count} processes (each needs "
                     "at least one); use fewer processes or more clients.")
  if not 0 <= index < count:
    raise ValueError(f"process_clients: process_index must be in [0, {count}), got {index}.")
  bounds = np.linspace(0, num_clients, count + 1).round().astype(int)
  return np.arange(bounds[index], bounds[index + 1])


def allreduce_sum(tree):
  """The sum over processes of ``tree`` (host or device arrays of the same shapes on every process), the same on
  every process, as numpy arrays. One process: ``tree`` itself (as numpy). Summed in process order, in float64 for
  floating leaves, so every process gets bit-identical values."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils

  def one(a):
    a = np.asarray(a)
    wide = a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a
    return multihost_utils.process_allgather(wide).sum(0).astype(a.dtype)

  return jax.tree.map(one, tree)


def assert_same(value, what: str) -> None:
  """Raises on every process if ``value`` (e.g. the round's cohort) differs between processes, naming ``what``."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  try:
    multihost_utils.assert_equal(np.asarray(value), fail_message=what)
  except AssertionError as e:
    raise ValueError(f"{what} differs between processes: every process must compute it from the same seed and "
                     f"inputs ({e}).") from None
