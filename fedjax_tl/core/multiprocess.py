"""A round split across processes (JAX's multi-controller runtime, :mod:`fedjax_tl.distributed`).

Every process runs the same program: the same server state, the same cohort (sampled from the same seed; checked
every round), the same round key. Each process trains only the cohort's clients it holds, at their positions in
the whole cohort (secure aggregation's masks and every per-client key depend on the position and the client id,
never on which process trains the client), and reduces them to partial :class:`RoundSums`. One cross-process
collective (:func:`fedjax_tl.distributed.allreduce_sum`) then adds the partial sums (weighted deltas, weights,
model-state and message sums) and gathers the per-client outputs (metrics, new client rows, transform carries)
into their cohort positions, so every process continues the round -- the aggregator's ``aggregate``/``decode``,
the server optimizer, the scatter into the per-client store -- with the whole cohort's values and ends it with
the same replicated :class:`~fedjax_tl.core.fedavg.ServerState` and the same metrics. Aggregators (secure
aggregation, DP) see the whole cohort's sums: they aggregate after the reduction.

Which process holds which client's examples:

* :class:`ProcessData` (a :class:`~fedjax_tl.data.client_data.FederatedData` of this process's clients only, with
  their global ids): ``ProcessData.for_process(dataset, partition)`` keeps the examples of the clients
  :func:`fedjax_tl.distributed.process_clients` gives this process (contiguous blocks of ids); the constructor
  takes any assignment (each client held by exactly one process, checked). Its ``num_clients`` is the whole
  population's, so sampling, the per-client store and the hooks see global client ids.
* a plain ``FederatedData`` (every process holds every example) under several processes: the cohort is split in
  :func:`~fedjax_tl.distributed.process_clients` blocks as well; only the training is divided.

The result equals the single-process round up to float rounding: the partial sums are added in float64 and
rounded once, where one process adds the clients one by one in float32 (tests/test_distributed.py: after 3 rounds
of 2 processes the params are within 1.5e-7 of the single-process run's). Per-client values (metrics, rows) are
exact, and so is the whole round under secure aggregation (integer sums) with clients trained one by one (a vmapped
chunk's float results may depend on how many clients it holds): 4 processes are bit-identical to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence  # noqa: F401  (pdoc resolves the inherited fields' annotations here)
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import distributed
from fedjax_tl.data.client_data import Cohort, Dataset, FederatedData
from fedjax_tl.data.partition import Partition

__all__ = ["ProcessData", "CohortSplit", "split_cohort"]


@dataclasses.dataclass
class ProcessData(FederatedData):
  """The examples of this process's clients only, in a run of several processes (see the module docstring).

  ``x``, ``y`` and ``client_indices`` are this process's (``client_indices[i]`` indexes the local ``x``);
  ``client_ids[i]`` is the global id of local client ``i``; ``population`` is the number of clients of the whole
  run. ``num_clients`` is the population (rounds sample, store rows and key clients by global id); the local count
  is ``num_local_clients`` and ``client_sizes`` is the local clients'. ``pad_size`` must be the population's
  largest client (every process compiles the same round): give it, or let the constructor find it with one
  collective, which also finds and checks ``owners`` (the process holding each client: every client exactly
  once). ``process_index``/``process_count`` default to JAX's.
  """

  client_ids: np.ndarray | None = None
  population: int = 0
  owners: np.ndarray | None = None
  process_index: int | None = None
  process_count: int | None = None

  def __post_init__(self):
    if self.client_ids is None or not self.population:
      raise ValueError("ProcessData needs client_ids (the global id of each local client) and population (the "
                       "number of clients of the whole run); or build it with ProcessData.for_process(dataset, "
                       "partition).")
    ids = np.asarray(self.client_ids, np.int64).reshape(-1)
    if len(ids) != len(self.client_indices):
      raise ValueError(f"ProcessData has {len(self.client_indices)} local clients but {len(ids)} client_ids.")
    if len(ids) and (ids.min() < 0 or ids.max() >= self.population or len(np.unique(ids)) != len(ids)):
      raise ValueError(f"ProcessData's client_ids must be distinct ids in [0, {self.population}).")
    self.client_ids = ids
    self.process_index = jax.process_index() if self.process_index is None else int(self.process_index)
    self.process_count = jax.process_count() if self.process_count is None else int(self.process_count)
    sizes = np.zeros(self.population, np.int64)
    sizes[ids] = [len(c) for c in self.client_indices]
    if self.owners is None or not self.pad_size:  # one collective: who holds which client, and every size
      held = np.zeros(self.population, np.int32)
      held[ids] = 1
      mine = np.where(held == 1, self.process_index, 0).astype(np.int32)
      total = distributed.allreduce_sum({"held": held, "owner": mine, "sizes": sizes.astype(np.int32)}) \
          if self.process_count > 1 else {"held": held, "owner": mine, "sizes": sizes}
      bad = np.flatnonzero(total["held"] != 1)
      if len(bad):
        raise ValueError(f"ProcessData: {len(bad)} clients are held by {sorted(set(total['held'][bad].tolist()))} "
                         f"processes instead of exactly one (e.g. client {bad[0]}); every client of the population "
                         "must be held by exactly one process.")
      self.owners = self.owners if self.owners is not None else total["owner"]
      sizes = np.asarray(total["sizes"], np.int64)
      if not self.pad_size:
        self.pad_size = max(int(sizes.max()), 1)
    self.owners = np.asarray(self.owners, np.int32)
    if self.owners.shape != (self.population,) or not np.array_equal(self.owners[ids], np.full(len(ids),
                                                                                               self.process_index)):
      raise ValueError(f"ProcessData's owners must give the process of each of the {self.population} clients, and "
                       f"this process ({self.process_index}) for its own.")
    self._population_sizes = sizes
    self._local_of = np.full(self.population, -1, np.int64)
    self._local_of[ids] = np.arange(len(ids))
    if len(ids) == 0:  # a process without clients: one empty client keeps FederatedData's invariants
      raise ValueError(f"Process {self.process_index} holds no client; use fewer processes than clients.")
    super().__post_init__()

  @classmethod
  def for_process(cls, data: Dataset, partition: Partition, pad_size: int = 0, process_index: int | None = None,
                  process_count: int | None = None, device: jax.Device | None = None) -> ProcessData:
    """This process's part of ``data`` under ``partition`` (the whole population's index lists): the clients
    :func:`~fedjax_tl.distributed.process_clients` gives it, with a copy of only their examples on ``device``.
    Needs no collective (the blocks and sizes follow from the partition)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    parts = [np.asarray(c, np.int64) for c in partition]
    n = len(parts)
    mine = distributed.process_clients(n, index, count)
    owners = np.zeros(n, np.int32)
    for p in range(count):
      owners[distributed.process_clients(n, p, count)] = p
    take = np.concatenate([parts[c] for c in mine]) if len(mine) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(parts[c]) for c in mine])]).astype(np.int64)
    local = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(mine))]
    x = jax.device_put(np.asarray(data.x[take]), device)
    y = np.asarray(data.y[take])  # stored as FederatedData.from_partition stores them (labels or other targets)
    y = jax.device_put(y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_ else
                                np.float32), device)
    pad = pad_size or max(max((len(c) for c in parts), default=1), 1)
    return cls(x, y, local, data.num_classes, pad, client_ids=mine, population=n, owners=owners,
               process_index=index, process_count=count)

  @property
  def num_clients(self) -> int:
    """The whole population's number of clients (global ids are ``0 .. num_clients - 1``)."""
    return self.population if hasattr(self, "_local_of") else len(self._sizes)

  @property
  def num_local_clients(self) -> int:
    return len(self._sizes)

  @property
  def population_sizes(self) -> np.ndarray:
    """Every client's number of examples, by global id."""
    return self._population_sizes.copy()

  def local_cohort(self, client_ids, pad_clients_to: int | None = None) -> Cohort:
    """The cohort of ``client_ids`` (global ids, all held here): indices into the local examples, client ids
    global (keys, rows and hooks see the global id)."""
    ids = np.asarray(client_ids, np.int64).reshape(-1)
    local = self._local_of[ids] if len(ids) else ids
    if len(ids) and (local < 0).any():
      raise ValueError(f"Process {self.process_index} does not hold clients {ids[local < 0][:5].tolist()}.")
    cohort = FederatedData.cohort(self, local, pad_clients_to)
    out = np.full(cohort.size, -1, np.int32)
    out[:len(ids)] = ids
    return cohort._replace(client_ids=jnp.asarray(out))

  def cohort(self, client_ids, pad_clients_to: int | None = None) -> Cohort:
    return self.local_cohort(client_ids, pad_clients_to)


_BLOCKS: dict = {}


def _block_owners(num_clients: int, count: int) -> np.ndarray:
  key = (num_clients, count)
  if key not in _BLOCKS:
    owners = np.zeros(num_clients, np.int32)
    for p in range(count):
      owners[distributed.process_clients(num_clients, p, count)] = p
    _BLOCKS[key] = owners
  return _BLOCKS[key]


@dataclasses.dataclass
class CohortSplit:
  """This process's part of one round's cohort, and how to put the parts together again."""

  cohort: Cohort  # this process's clients, in cohort order (global ids), padded to the same size on every process
  positions: jax.Array  # int32: their positions in the round's cohort; padding gets positions n, n+1, ... (no client)
  setup_padded: int  # the padded cohort size the aggregator's setup sizes its per-position data for
  padded: int  # the round's padded cohort size (the single-process runner's)
  mine: np.ndarray  # the cohort positions (< n) of this process's clients
  global_ids: np.ndarray  # int32 [padded]: the round's cohort ids (-1: padding)
  global_sizes: np.ndarray  # int32 [padded]: their numbers of examples

  def local(self, per_client: jax.Array | None) -> jax.Array | None:
    """A per-client array of the whole (padded) cohort, ``[padded, ...]``, cut to this process's part (zeros for
    its padding)."""
    if per_client is None:
      return None
    a = np.asarray(per_client)
    out = np.zeros((self.cohort.size, *a.shape[1:]), a.dtype)
    out[:len(self.mine)] = a[self.mine]
    return jnp.asarray(out)

  def combine(self, sums, carry: Any = None):
    """The whole cohort's :class:`~fedjax_tl.core.execution.RoundSums` (every process's partial sums added, the
    per-client outputs at their cohort positions, ``[padded, ...]``), the whole cohort and the cohort's carries
    as they were before the round (``carry``: this process's part, ``[C_local, ...]``, or None), on every
    process; one collective."""
    m, mine, padded = len(self.mine), self.mine, self.padded

    def spread(a):
      a = np.asarray(a)
      out = np.zeros((padded, *a.shape[1:]), a.dtype)
      out[mine] = a[:m]
      return out

    per_client = jax.tree.map(spread, (sums.client_metrics, sums.client_rows, sums.client_carry, carry))
    sums_part = (sums.delta_sum, sums.state_sum, sums.weight_sum, sums.message_sum)
    total, (metrics, rows, new_carry, old_carry) = distributed.allreduce_sum((sums_part, per_client))
    total = jax.tree.map(jnp.asarray, total)
    delta_sum, state_sum, weight_sum, message_sum = total
    out = sums._replace(delta_sum=delta_sum, state_sum=state_sum, weight_sum=weight_sum, message_sum=message_sum,
                        client_metrics=jax.tree.map(jnp.asarray, metrics), client_rows=jax.tree.map(jnp.asarray, rows),
                        client_carry=jax.tree.map(jnp.asarray, new_carry))
    cohort = Cohort(jnp.asarray(self.global_ids), None, jnp.asarray(self.global_sizes))
    return out, cohort, jax.tree.map(jnp.asarray, old_carry)


def split_cohort(data: FederatedData, client_ids: np.ndarray, padded: int, runner: Any,
                 round_key: jax.Array, sampled: np.ndarray | None = None) -> CohortSplit | None:
  """This process's part of the round of ``client_ids`` (the reporting clients, padded to ``padded`` in one
  process), or None when the round is not split (one process, data not process-local). Checks that every process
  has the same cohort and round key (one small collective)."""
  local = isinstance(data, ProcessData)
  count = jax.process_count()
  if not local and count == 1:
    return None
  mesh = getattr(runner, "mesh", None)
  if mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    # A mesh over every process's devices: one SPMD program over the whole cohort (JAX partitions it), which
    # needs every process to hold the same data.
    if local:
      raise ValueError("FedAvg(mesh=...) spans the devices of several processes, which runs the whole cohort as "
                       "one program over all of them and needs every process to hold the whole data: use a plain "
                       "FederatedData with that mesh, or a mesh of this process's devices (jax.local_devices()) "
                       "with ProcessData.")
    return None
  if local and data.process_count != count:
    raise ValueError(f"The ProcessData was built for {data.process_count} processes, but the run has {count} "
                     f"(jax.process_count()); build it after fedjax_tl.distributed.initialize().")
  ids = np.asarray(client_ids, np.int64).reshape(-1)
  raw = round_key if round_key.dtype == jnp.uint32 else jax.random.key_data(round_key)
  sampled = ids if sampled is None else np.asarray(sampled, np.int64)
  distributed.assert_same(np.concatenate([[len(sampled), len(ids), padded], sampled, ids,
                                          np.asarray(raw, np.int64).ravel()]),
                          "the round's cohort (client ids, reporting clients) and round key")
  owners = data.owners if local else _block_owners(data.num_clients, count)
  me = data.process_index if local else jax.process_index()
  n = len(ids)
  where = owners[ids] if n else np.zeros(0, np.int32)
  mine = np.flatnonzero(where == me)
  # Every process pads its part to the same size: the largest part of the sampled cohort (whoever reports, as the
  # single-process round keeps the sampled cohort's program) rounded up to a power of two, at most the sampled
  # cohort (so rounds compile a few shapes only; one process: exactly the single-process round's), then to the
  # schedule's chunks.
  largest = int(np.bincount(owners[sampled], minlength=count).max()) if len(sampled) else 0
  bucket = min(1 << max(largest - 1, 0).bit_length(), len(sampled))
  local_padded = runner.padded_cohort_size(max(bucket, 1))
  cohort = data.local_cohort(ids[mine], local_padded) if local else data.cohort(ids[mine], local_padded)
  positions = np.concatenate([mine, n + np.arange(local_padded - len(mine))]).astype(np.int32)
  global_ids = np.full(padded, -1, np.int32)
  global_ids[:n] = ids
  sizes = data.population_sizes if local else data.client_sizes
  global_sizes = np.zeros(padded, np.int32)
  global_sizes[:n] = sizes[ids]
  return CohortSplit(cohort, jnp.asarray(positions), max(padded, n + local_padded), padded, mine, global_ids,
                     global_sizes)
