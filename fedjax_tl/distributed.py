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

A federated round splits its cohort across the processes by itself (:mod:`fedjax_tl.core.multiprocess`): give
``FedAvg.apply`` / ``run_rounds`` a :class:`~fedjax_tl.core.multiprocess.ProcessData` (this process's clients'
examples only; ``ftl.ProcessData.for_process(dataset, partition)``): each process trains the cohort's clients it
holds, :func:`allreduce_sum` adds the round's sums and gathers the per-client outputs, and every process ends the
round with the same server state. A process that dies makes the others fail with :class:`ProcessFailedError` in
their next collective (and JAX ends any still waiting after ``heartbeat_timeout``). docs/performance.md
("Several processes") has what the tests show and the launch commands.
"""

from __future__ import annotations

import os

import jax
import numpy as np

__all__ = ["initialize", "is_initialized", "process_clients", "allreduce_sum", "assert_same", "ENV", "HEARTBEAT_ENV",
           "ProcessFailedError"]

# The launcher's environment variables (fedjax_tl.launch): coordinator "host:port", process count, process id.
ENV = ("FEDJAX_TL_COORDINATOR", "FEDJAX_TL_NUM_PROCESSES", "FEDJAX_TL_PROCESS_ID")

# Seconds without a heartbeat after which JAX's coordination service declares a process dead (initialize).
HEARTBEAT_ENV = "FEDJAX_TL_HEARTBEAT_TIMEOUT"

_STATE = {"initialized": False}


class ProcessFailedError(RuntimeError):
  """A cross-process collective failed: another process of the run most likely died (its log says why)."""


def _allgather(a: np.ndarray, what: str) -> np.ndarray:
  """``a`` from every process, stacked ``[processes, ...]``; a failed collective (a process died: gloo loses its
  connection) becomes a :class:`ProcessFailedError` naming ``what`` was being exchanged."""
  from jax.experimental import multihost_utils

  try:
    return np.asarray(multihost_utils.process_allgather(a))
  except Exception as e:  # noqa: BLE001  XlaRuntimeError (gloo: connection closed), RuntimeError, ...
    text = " ".join(str(e).split())[:300]
    raise ProcessFailedError(
        f"Process {jax.process_index()} of {jax.process_count()}: the collective exchanging {what} failed "
        f"({type(e).__name__}: {text}). Another process has most likely died or been stopped: see its log (under "
        "python -m fedjax_tl.launch, the lines prefixed with its index). JAX's coordination service also ends the "
        f"remaining processes once a process misses heartbeats for the heartbeat timeout ({HEARTBEAT_ENV}).") from e


def is_initialized() -> bool:
  """Whether :func:`initialize` ran in this process."""
  return _STATE["initialized"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int | None = None) -> tuple[int, int]:
  """Joins this process to the others (``jax.distributed.initialize``) and returns (process index, process count).

  With the arguments, or with the launcher's environment (:data:`ENV`), the processes meet at
  ``coordinator_address`` and, on CPU, use the gloo collectives (set before JAX's backend starts: call this before
  any other JAX work). Without either, JAX detects the cluster itself (TPU pod slices, SLURM, Open MPI). Calling
  it again is a no-op.

  ``heartbeat_timeout`` (seconds; default: the environment's ``FEDJAX_TL_HEARTBEAT_TIMEOUT``, else JAX's 100) is how
  long JAX's coordination service waits for a process that stopped sending heartbeats (it died, or its machine
  did) before it fails the run: every other process then ends with an error naming the missing task instead of
  waiting forever in the round's collective. The launcher also stops the others as soon as one exits."""
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
  if heartbeat_timeout is None and os.environ.get(HEARTBEAT_ENV):
    heartbeat_timeout = int(os.environ[HEARTBEAT_ENV])
  timeouts = {} if heartbeat_timeout is None else {"heartbeat_timeout_seconds": int(heartbeat_timeout)}
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"initialize: process_id must be in [0, {num_processes}), got {process_id}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's cross-process collectives
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
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
  """The sum over processes of ``tree`` (host or device arrays of the same shapes and dtypes on every process),
  the same on every process, as numpy arrays. One process: ``tree`` itself (as numpy).

  One collective for the whole tree: every leaf is widened to float64 (exact for floats up to 32 bits and for
  integers up to 32 bits), packed into one buffer, gathered from every process as raw bits and summed on the
  host in process order, so every process gets bit-identical values. Back in its dtype, a float leaf is the
  float64 sum rounded once, an unsigned-integer leaf is the sum modulo 2^bits (field elements, e.g. secure
  aggregation's masked vectors, stay field elements), a signed one wraps, a bool is "any". 64-bit integer
  leaves are summed as int64 (wrapping)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(a) for a in leaves]
  wide = [a.dtype.itemsize == 8 and np.issubdtype(a.dtype, np.integer) for a in leaves]
  f64 = [a.astype(np.float64).ravel() for a, w in zip(leaves, wide) if not w]
  i64 = [a.astype(np.int64).ravel() for a, w in zip(leaves, wide) if w]
  f_buf = np.concatenate(f64) if f64 else np.zeros(0, np.float64)
  i_buf = np.concatenate(i64) if i64 else np.zeros(0, np.int64)
  # Raw bits through the collective (JAX without x64 would narrow float64 values to float32 on the way).
  packed = np.concatenate([f_buf.view(np.uint32), i_buf.view(np.uint32)])
  gathered = _allgather(packed, "a sum")  # [processes, len]
  nf = 2 * f_buf.size
  f_sum = np.ascontiguousarray(gathered[:, :nf]).view(np.float64).sum(0)
  with np.errstate(over="ignore"):
    i_sum = np.ascontiguousarray(gathered[:, nf:]).view(np.int64).sum(0)
  out, fo, io = [], 0, 0
  for a, w in zip(leaves, wide):
    if w:
      out.append(i_sum[io:io + a.size].reshape(a.shape).astype(a.dtype))
      io += a.size
      continue
    s = f_sum[fo:fo + a.size].reshape(a.shape)
    fo += a.size
    if a.dtype == np.bool_:
      out.append(s != 0)
    elif np.issubdtype(a.dtype, np.integer):
      bits = 8 * a.dtype.itemsize
      out.append(np.mod(s, 2.0 ** bits).astype(np.uint64).astype(a.dtype))  # wraps like the dtype's own sum
    else:
      out.append(s.astype(a.dtype))
  return jax.tree.unflatten(treedef, out)


def assert_same(value, what: str) -> None:
  """Raises on every process if ``value`` (e.g. the round's cohort) differs between processes, naming ``what``.

  Compares a digest of the value's dtype, shape and bytes (one small collective of raw bits: 64-bit values are
  compared whole, not narrowed by JAX's 32-bit default)."""
  if jax.process_count() == 1:
    return
  import hashlib

  a = np.ascontiguousarray(np.asarray(value))
  digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).digest()
  gathered = _allgather(np.frombuffer(digest, np.uint32), what)
  differ = [p for p in range(len(gathered)) if not np.array_equal(gathered[p], gathered[0])]
  if differ:
    raise ValueError(f"{what} differs between processes (processes {differ} differ from process 0): every process "
                     "must compute it from the same seed and inputs.")
