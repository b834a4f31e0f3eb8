"""Execution schedules: how a cohort's local training is laid out on the backend.

A schedule has two independent axes:

* **clients** - ``chunk_size`` clients are trained together under ``vmap``; chunks run one after another.
  ``chunk_size=0`` vmaps the whole cohort ("vmap"), ``1`` is sequential, ``k`` is chunked. Under vmap each
  client has its own weights, so XLA turns convolutions into grouped convolutions.
* **steps** - ``loop="scan"`` runs the whole round (chunks and local steps) as one XLA program with
  ``lax.scan`` (steps unrolled ``unroll`` at a time); ``loop="host"`` calls a jitted block of ``unroll``
  unrolled steps from Python, then single steps up to the chunk's last active step, so a chunk of small
  clients costs only its own steps. Each of the two is compiled when a chunk first runs it, so a population
  whose clients all have fewer than ``unroll`` steps never compiles the unrolled block.

Measured on a 2-core x86 CPU, JAX 0.10.2, the workload-P CNN at batch 32 (see experiments/bench_schedules.py
and the table in docs/performance.md): convolutions inside a rolled ``lax.scan`` are ~15x slower than the same steps
unrolled (jax issue 12868), and vmap over clients is ~3x slower than sequential. So the CPU default is
sequential clients: the whole round in one program (steps in a ``lax.scan``) when the model as trained has no XLA
convolution (after the fast path's rewrite of its convolutions to matrix products), a host loop over unrolled
blocks when it has one; accelerators default to the whole cohort vmapped in one program
(:func:`default_schedule`).

Every schedule computes the same thing as a plain per-client Python loop (tests/test_execution.py). Nothing
recompiles between rounds: shapes depend on the cohort size and the population's padded client size only,
and the cohort is padded with empty clients up to a multiple of ``chunk_size``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import keys as prng
from fedjax_tl.aggregators.base import SUM, Reducer, reduce_message, weighted_sum
from fedjax_tl.core.checks import format_diff, tree_diff
from fedjax_tl.core.client import ClientOutput, LocalTraining
from fedjax_tl.data.client_data import Cohort
from fedjax_tl.tree import abstract_init, iter_eqns
from fedjax_tl.types import ModelState, Params, PRNGKey

__all__ = ["Schedule", "CohortRunner", "RoundSums", "ClientContext", "default_schedule", "has_convolution",
           "iter_eqns", "client_mesh", "sample_clients"]


class ClientContext(NamedTuple):
  """What a client's postprocessing sees besides its output (vmapped fields are per client)."""

  client_id: jax.Array  # int32 scalar; -1 for a padding client
  position: jax.Array  # int32 scalar: the client's index in the padded cohort
  key: PRNGKey  # the client's own postprocessing key
  shared: Any  # round-wide data for every client (FedAvg: the aggregator's state and its setup's output); or None


# Applied to each client's output before aggregation (clipping, compression, secure-aggregation masking); pure
# and vmappable. ``carry`` is the client's own state that persists across rounds (e.g. error-feedback
# residuals; None when unused); the function returns the new output and the new carry.
ClientPostprocess = Callable[[ClientOutput, Any, ClientContext], tuple[ClientOutput, Any]]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How to run a cohort. Parse from text with :meth:`parse`.

  Attributes:
    chunk_size: clients trained together with vmap; 0 = the whole cohort, 1 = sequential, -1 ("chunked:auto")
      = as many as fit a memory budget, resolved on the first round (:meth:`CohortRunner.resolve`).
    loop: "scan" (one XLA program per round) or "host" (Python loop over jitted blocks of steps).
    unroll: local steps unrolled per scan iteration or per host block.

  Where it runs (the backend choices, resolved against the target, not the process's default backend):
    mesh: a ``jax.sharding.Mesh`` with an axis "clients": each chunk's clients are split across its devices
      (one-program schedules; :func:`client_mesh`). ``schedule.on(mesh)``.
    memory_budget: bytes a chunk of "chunked:auto" may use (default: half the device's free memory, or a quarter
      of the host's RAM on CPU).
    cpu_rewrite: on a CPU target, train the model through the fast path (:func:`fedjax_tl.models.fast.fast_cpu`:
      convolutions as matrix products, same function); never on GPU/TPU targets.
    platform: the target platform ("cpu", "gpu", "tpu"); default the mesh's devices', else the default backend.
      The planner sets it to compile for a TPU from a CPU host.
  """

  chunk_size: int = 0
  loop: str = "scan"
  unroll: int = 1
  mesh: jax.sharding.Mesh | None = dataclasses.field(default=None, compare=True)
  memory_budget: int | None = None
  cpu_rewrite: bool = True
  platform: str | None = None

  def __post_init__(self):
    if self.loop not in ("scan", "host"):
      raise ValueError(f"Schedule loop must be 'scan' or 'host', got {self.loop!r}.")
    if self.chunk_size < -1 or self.unroll < 1:
      raise ValueError(f"Need chunk_size >= 0 and unroll >= 1, got {self.chunk_size}, {self.unroll}.")
    if self.memory_budget is not None and self.memory_budget < 1:
      raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}.")
    if self.platform not in (None, "cpu", "gpu", "tpu"):
      raise ValueError(f"Schedule platform must be 'cpu', 'gpu' or 'tpu', got {self.platform!r}.")

  def on(self, mesh: jax.sharding.Mesh | None) -> Schedule:
    """This schedule with its clients sharded over ``mesh`` (axis "clients")."""
    return dataclasses.replace(self, mesh=mesh)

  @property
  def target_platform(self) -> str:
    """The platform the schedule's programs run on: ``platform``, the mesh's devices', or the default backend."""
    if self.platform is not None:
      return self.platform
    if self.mesh is not None:
      return self.mesh.devices.flat[0].platform
    return jax.default_backend()

  def resolve_local(self, local: LocalTraining) -> LocalTraining:
    """``local`` as this schedule runs it: the CPU fast path only where the target is a CPU and ``cpu_rewrite``
    allows it (``local`` itself when nothing changes, so equal configurations share programs)."""
    fast = local.fast_path and self.cpu_rewrite and self.target_platform == "cpu"
    return local if fast == local.fast_path else dataclasses.replace(local, fast_path=fast)

  @classmethod
  def parse(cls, spec: str) -> Schedule:
    """Parses ``CLIENTS[/LOOP[:UNROLL]]``: CLIENTS is ``vmap``, ``sequential`` or ``chunked:K``; LOOP is
    ``scan`` or ``host``. Examples: ``vmap``, ``sequential/host:8``, ``chunked:4/scan:2``; ``auto`` is the
    measured default for the current backend (:func:`default_schedule`)."""
    spec = spec.strip()
    if spec == "auto":
      return default_schedule()
    m = re.fullmatch(r"(vmap|sequential|chunked:(\d+|auto))(?:/(scan|host)(?::(\d+))?)?", spec)
    if not m:
      raise ValueError(f"Cannot parse schedule {spec!r}; expected e.g. 'vmap', 'sequential/host:8', "
                       "'chunked:4/scan:2' or 'auto'.")
    clients, k, loop, unroll = m.groups()
    chunk = 0 if clients == "vmap" else 1 if clients == "sequential" else -1 if k == "auto" else int(k)
    if clients.startswith("chunked") and chunk == 0:
      raise ValueError(f"chunked:K needs K >= 1, got {spec!r}.")
    return cls(chunk, loop or "scan", int(unroll or 1))

  def __str__(self) -> str:
    clients = "vmap" if self.chunk_size == 0 else "sequential" if self.chunk_size == 1 else \
        "chunked:auto" if self.chunk_size == -1 else f"chunked:{self.chunk_size}"
    return f"{clients}/{self.loop}:{self.unroll}"


def default_schedule(backend: str | None = None, local: LocalTraining | None = None) -> Schedule:
  """The fastest measured schedule for ``backend`` (default: the current one) and, on CPU, the model.

  CPU: sequential clients. If the model as trained (``local.train_model``, traced abstractly, i.e. after the
  fast-path rewrite of its convolutions to matrix products) has no XLA convolution, the whole
  round is one program with the steps in a ``lax.scan`` (``sequential/scan:1``); with XLA convolutions, a host
  loop over jitted blocks of 8 unrolled steps (``sequential/host:8``), because XLA:CPU runs a convolution inside
  a loop body an order of magnitude slower than outside one (jax-ml/jax#12868; measured: 75 vs 1392 examples/s
  for the workload-P CNN with ``nn.Conv``). Without ``local`` the CPU answer is the convolution-safe one.
  Measured with ``experiments/bench_schedules.py`` (docs/performance.md).
  GPU/TPU: the whole cohort vmapped in one program, steps in a scan (unroll 1), which keeps the device busy
  with large batched kernels and no host round-trips; revisit with a GPU benchmark when one is available.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return Schedule(0, "scan", 1)
  if local is not None and not has_convolution(local):
    return Schedule(1, "scan", 1)
  return Schedule(1, "host", 8)


def has_convolution(local: LocalTraining) -> bool:
  """Whether one local step of ``local`` (its model's training forward pass, traced abstractly on one example:
  nothing is computed or compiled) contains an XLA convolution. The model is the one the steps run
  (``local.train_model``): on CPU the fast-path rewrite has turned its supported convolutions into matrix
  products."""
  model = local.train_model
  params, state = abstract_init(model)
  x = jax.ShapeDtypeStruct((1, *model.sample_shape), model.sample_dtype)
  mask = jax.ShapeDtypeStruct((1,), jnp.bool_)
  fn = lambda p, s, xb, m: model.apply(p, s, xb, train=True, mask=m, rng=jax.random.PRNGKey(0))  # noqa: E731
  jaxpr = jax.make_jaxpr(fn)(params, state, x, mask).jaxpr
  return any(eqn.primitive.name == "conv_general_dilated" for eqn in iter_eqns(jaxpr))


def default_memory_budget() -> int:
  """Half the free memory of the first device where it reports it, else a quarter of the host's RAM."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
  return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@functools.cache
def _jit_method(fn: Callable, static_argnums: tuple[int, ...], donate_argnums: tuple[int, ...]):
  """One ``jax.jit`` per method, with ``self`` (hashable by configuration) as static argument 0."""
  return jax.jit(fn, static_argnums=(0, *(i + 1 for i in static_argnums)),
                 donate_argnums=tuple(i + 1 for i in donate_argnums))


_COMPILED: dict = {}  # runner configuration -> its host loop's compiled blocks


class _SharedJit:
  """A method of ``owner`` jitted with ``owner`` static, so equal owners hit the same compilation cache."""

  def __init__(self, fn: Callable, owner: Any, static_argnums: tuple[int, ...] = (),
               donate_argnums: tuple[int, ...] = ()):
    self._jit = _jit_method(fn, static_argnums, donate_argnums)
    self._owner = owner

  def __call__(self, *args):
    return self._jit(self._owner, *args)

  def lower(self, *args):
    return self._jit.lower(self._owner, *args)


class RoundSums(NamedTuple):
  """What a cohort sends up, already reduced: weighted sums over clients, plus per-client metrics."""

  delta_sum: Params  # the reducer's sum of the clients' messages (sum_i w_i * delta_i for SUM; a Message when
  # the aggregator encodes the hooks' message with the delta: aggregators.base.reduce_message)
  state_sum: ModelState  # sum_i w_i * model_state_i
  weight_sum: jax.Array  # sum_i w_i
  client_metrics: dict[str, jax.Array]  # each [C] (padding clients included; their num_examples is 0)
  client_rows: Any = None  # [C, ...] each client's new row: the parts of ClientOutput.row the runner keeps (row_parts)
  client_carry: Any = None  # [C, ...] each client's new postprocessing carry (None when unused)
  message_sum: Any = None  # sum_i message_i over real clients: the hooks' message when sent beside the delta


class CohortRunner:
  """Runs a cohort's local training under a :class:`Schedule` and reduces it to :class:`RoundSums`.

  Compiles once per (cohort size, padded client size) and, for the host loop, once per block length when a
  chunk first needs it; later rounds reuse the compiled programs.
  ``trace_count`` counts how many times the traced functions were (re)traced, for tests.
  """

  def __init__(self, local: LocalTraining, schedule: Schedule, pad_size: int,
               postprocess: ClientPostprocess | None = None, row_parts: tuple[str, ...] = (),
               mesh: jax.sharding.Mesh | None = None, reducer: Reducer = SUM):
    if mesh is not None and schedule.mesh is None:
      schedule = schedule.on(mesh)  # (the schedule owns it; the argument is its older spelling)
    mesh = schedule.mesh
    local = schedule.resolve_local(local)  # the CPU fast path where the target is a CPU, never elsewhere
    self.local = local
    # reducer: how the clients' (postprocessed) deltas are summed, as the aggregator declares it
    # (fedjax_tl.aggregators.base: SUM, or ModularSum for secure aggregation's field elements). The model states
    # and the hooks' messages, sent in the clear, are weighted sums.
    self.reducer = reducer
    # mesh: shard each chunk's clients over the mesh axis "clients" (data and params replicated); XLA's SPMD
    # partitioner turns the weighted sums over clients into a cross-device reduction. "scan" loop only.
    if mesh is not None:
      if schedule.loop != "scan":
        raise ValueError("Sharding the cohort over devices needs a one-program schedule (loop 'scan'), got "
                         f"{schedule}.")
      if "clients" not in mesh.axis_names:
        raise ValueError(f"The mesh needs an axis named 'clients', got {mesh.axis_names}.")
      n_dev = mesh.shape["clients"]
      if schedule.chunk_size and schedule.chunk_size % n_dev:
        raise ValueError(f"chunk_size {schedule.chunk_size} must be a multiple of the {n_dev} devices.")
    self.mesh = mesh
    # row_parts: which parts of the clients' new rows (ClientOutput.row: "model_state", "params", "algorithm")
    # come back in RoundSums.client_rows, [C, ...]; their rows go in as __call__'s ``rows``.
    self.row_parts = tuple(row_parts)
    self.schedule = schedule
    self.pad_size = pad_size
    self.num_steps = local.num_steps(pad_size)
    self.postprocess = postprocess
    self.trace_count = 0
    # Jitted with the runner itself as a static argument: runners of equal configuration (equal local training,
    # schedule, pad size, postprocessing, state handling and mesh) share the traced and compiled programs.
    self._round_jit = _SharedJit(CohortRunner._round_scan, self)
    self._init_jit = _SharedJit(CohortRunner._init_chunk, self)
    self._choose_jit = _SharedJit(CohortRunner._choose_chunk, self)
    self._block_jit = _SharedJit(CohortRunner._block, self, static_argnums=(6,), donate_argnums=(0,))
    self._finish_jit = _SharedJit(CohortRunner._finish_chunk, self)
    # The host loop's ahead-of-time compiled blocks, shared by equal runners like the jitted functions.
    self._compiled: dict[tuple[str, int], Any] = _COMPILED.setdefault(self, {})

  def _config(self) -> tuple:
    return (self.local, self.schedule, self.pad_size, self.postprocess, self.row_parts, self.mesh,
            self.reducer)

  def __eq__(self, other) -> bool:
    return type(other) is type(self) and self._config() == other._config()

  def __hash__(self) -> int:
    return hash(self._config())

  def with_schedule(self, schedule: Schedule) -> CohortRunner:
    """A runner like this one with another schedule (e.g. a resolved "chunked:auto")."""
    return CohortRunner(self.local, schedule, self.pad_size, self.postprocess, self.row_parts, self.mesh,
                        self.reducer)

  # ---- helpers over one chunk (leading axis k) ----
  def _client_keys(self, round_key: PRNGKey, client_ids: jax.Array) -> jax.Array:
    return jax.vmap(lambda c: prng.client(round_key, c))(client_ids)

  def _init_chunk(self, params, model_state, keys, num_examples, client_in, y=None):
    self.trace_count += 1
    return self._init(params, model_state, keys, num_examples, client_in, y)

  def _init(self, params, model_state, keys, num_examples, client_in, y=None):
    """Every client's training state; ``client_in`` = (rows, contexts, step budgets), each [k, ...] or None."""
    rows, contexts, budget = client_in
    return jax.vmap(self.local.init, (None, None, 0, 0, 0, 0, 0, None))(params, model_state, keys, num_examples,
                                                                         rows, contexts, budget, y)

  def _choose(self, states, frozen, x, y, indices):
    """Each client's start among the hooks' candidates (LocalTraining.choose), when they offer some."""
    if not self.local.chooses_start:
      return states
    return jax.vmap(self.local.choose, (0, None, None, None, 0))(states, frozen, x, y, indices)

  def _choose_chunk(self, states, frozen, x, y, indices):
    self.trace_count += 1
    return self._choose(states, frozen, x, y, indices)

  def _steps(self, states, t0, frozen, x, y, indices, n_steps: int):
    if indices.shape[0] == 1:
      # One client per chunk (sequential): run the unbatched step. vmap over a client axis of size 1 gives
      # XLA:CPU batched matrix products that it runs ~1.35x slower than the plain ones (measured, workload P
      # 10x500 sequential/scan:1: 2340 -> 3210 examples/s).
      def step(st, t, fr, xx, yy, ind):
        new = self.local.step(jax.tree.map(lambda a: a[0], st), t, fr, xx, yy, ind[0])
        return jax.tree.map(lambda a: a[None], new)
    else:
      step = jax.vmap(self.local.step, (0, None, None, None, None, 0))
    for i in range(n_steps):
      states = step(states, t0 + i, frozen, x, y, indices)
    return states

  def _block(self, states, t0, frozen, x, y, indices, n_steps: int):
    self.trace_count += 1
    return self._steps(states, t0, frozen, x, y, indices, n_steps)

  def _finish_chunk(self, states, params, acc: RoundSums | None, ctx: ClientContext, carry):
    self.trace_count += 1
    out = jax.vmap(self.local.finish, (0, None))(states, params)
    if self.postprocess is not None:
      ctx_axes = ClientContext(0, 0, 0, None)
      out, carry = jax.vmap(self.postprocess, (0, 0, ctx_axes))(out, carry, ctx)
    client_rows = {p: out.row[p] for p in self.row_parts} if self.row_parts else None
    real = (ctx.client_id >= 0).astype(jnp.float32)
    # A wire Message (the postprocessing put the hooks' message beside the delta for the aggregator): its mean
    # part weighted, its sum part summed over the real clients (aggregators.base.reduce_message).
    sums = RoundSums(reduce_message(self.reducer, out.delta, out.num_examples, real),
                     weighted_sum(out.model_state, out.num_examples), out.num_examples.sum(), out.metrics,
                     client_rows, carry, weighted_sum(out.message, real))
    if acc is None:
      return sums
    self._check_message(sums.message_sum, acc.message_sum)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return RoundSums(add(acc.delta_sum, sums.delta_sum), add(acc.state_sum, sums.state_sum),
                     acc.weight_sum + sums.weight_sum, sums.client_metrics, client_rows, carry,
                     add(acc.message_sum, sums.message_sum))

  def _check_message(self, got: Any, want: Any) -> None:
    """At trace time: this chunk's hook messages have the structure and shapes of the previous chunks' (they are
    summed over the cohort; jnp.add would fail on another structure and silently broadcast another shape)."""
    diff = tree_diff(got, want)
    if diff or jax.tree.structure(got) != jax.tree.structure(want):
      name = type(self.local.hooks).__name__
      raise ValueError(f"{name}.finish sent messages whose structure or shapes differ between the cohort's clients: "
                       f"{format_diff(diff) or f'{jax.tree.structure(got)} vs {jax.tree.structure(want)}'}. A message "
                       "must have the same structure and shapes for every client and round (it is summed over the "
                       "cohort): build it from the shapes of finish's arguments only, not from Python state or "
                       "values that change between calls.")

  def _train_chunk_scan(self, params, frozen, model_state, x, y, indices, keys, num_examples, client_in):
    states = self._choose(self._init(params, model_state, keys, num_examples, client_in, y), frozen, x, y, indices)
    u = self.schedule.unroll
    full, rest = divmod(self.num_steps, u)

    def body(s, t):
      return self._steps(s, t * u, frozen, x, y, indices, u), None

    states, _ = jax.lax.scan(body, states, jnp.arange(full))
    if rest:
      states = self._steps(states, full * u, frozen, x, y, indices, rest)
    return states

  def _round_scan(self, params, frozen, model_state, x, y, cohort: Cohort, round_key, carry, shared,
                  client_in=(None, None, None), positions=None):
    """The whole round as one program: a scan over chunks, each chunk vmapped, steps scanned."""
    self.trace_count += 1
    c = cohort.client_ids.shape[0]
    k = c if self.schedule.chunk_size == 0 else self.schedule.chunk_size
    keys = self._client_keys(round_key, cohort.client_ids)
    ctx = ClientContext(cohort.client_ids, _positions(positions, c), self._post_keys(keys), None)
    chunked = jax.tree.map(lambda a: a.reshape(c // k, k, *a.shape[1:]),
                           (cohort.indices, cohort.num_examples, keys, ctx, client_in, carry))
    if self.mesh is not None:  # clients of a chunk across devices; chunks still run one after another
      spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "clients"))
      chunked = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), chunked)

    def chunk_sums(acc, chunk):
      indices, n, ck, cctx, ci, cc = chunk
      states = self._train_chunk_scan(params, frozen, model_state, x, y, indices, ck, n, ci)
      return self._finish_chunk(states, params, acc, cctx._replace(shared=shared), cc)

    # The accumulator's dtypes follow what the postprocessing sends (floats, or field elements for secure
    # aggregation), so take them from an abstract evaluation of one chunk.
    first = jax.tree.map(lambda a: a[0], chunked)
    shapes = jax.eval_shape(lambda ch: chunk_sums(None, ch), first)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        (shapes.delta_sum, shapes.state_sum, shapes.weight_sum, shapes.message_sum))
    zero = RoundSums(*zero[:3], None, message_sum=zero[3])

    def body(acc, chunk):
      sums = chunk_sums(acc, chunk)
      per_client_out = (sums.client_metrics, sums.client_rows, sums.client_carry)
      return sums._replace(client_metrics=None, client_rows=None, client_carry=None), per_client_out

    acc, (metrics, client_rows, new_carry) = jax.lax.scan(body, zero, chunked)
    unchunk = lambda a: a.reshape(c, *a.shape[2:])
    return acc._replace(client_metrics=jax.tree.map(unchunk, metrics),
                        client_rows=jax.tree.map(unchunk, client_rows),
                        client_carry=jax.tree.map(unchunk, new_carry))

  @staticmethod
  def _post_keys(keys: jax.Array) -> jax.Array:
    return jax.vmap(prng.postprocess)(keys)

  # ---- public ----
  def resolve(self, params: Params, frozen: Params, model_state: ModelState, x: jax.Array, y: jax.Array,
              cohort_size: int, budget_bytes: int | None = None, rows: Any = None,
              contexts: Any = None) -> CohortRunner:
    """For "chunked:auto": a new runner whose chunk size is the number of clients whose training fits
    ``budget_bytes`` (default: half the device's free memory where the backend reports it, else a quarter of
    the host's RAM), from XLA's memory analysis of one client's compiled step (temporaries + the client's
    training state, which a vmapped chunk holds once per client), capped at ``cohort_size``; its
    ``chunk_memory`` says how it was sized. This runner is left unchanged (and returned when already resolved).
    """
    if self.schedule.chunk_size != -1:
      return self
    if budget_bytes is None:
      budget_bytes = self.schedule.memory_budget or default_memory_budget()
    n1 = jnp.ones((1,), jnp.int32)
    first = jax.tree.map(lambda a: a[:1], (rows, contexts, None))  # one client's row and context
    states = self._init_jit(params, model_state, jax.random.split(jax.random.PRNGKey(0), 1), n1, first, y)
    indices = jnp.zeros((1, self.pad_size), jnp.int32)
    mem = self._block_jit.lower(states, jnp.int32(0), frozen, x, y, indices, 1).compile().memory_analysis()
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(states))
    per_client = max(int(getattr(mem, "temp_size_in_bytes", 0)) + 2 * state_bytes, 1)
    k = int(max(1, min(cohort_size, budget_bytes // per_client)))
    if self.mesh is not None:
      n_dev = self.mesh.shape["clients"]
      k = max(n_dev, k // n_dev * n_dev)
    resolved = self.with_schedule(dataclasses.replace(self.schedule, chunk_size=k))
    resolved.chunk_memory = {"per_client_bytes": per_client, "budget_bytes": int(budget_bytes), "chunk_size": k}
    return resolved

  def padded_cohort_size(self, cohort_size: int) -> int:
    k = self.schedule.chunk_size
    if k == -1:
      raise ValueError('Schedule "chunked:auto" is resolved on the first round: use the runner from resolve().')
    if k == 0:
      k = self.mesh.shape["clients"] if self.mesh is not None else 1
    return math.ceil(cohort_size / k) * k

  def __call__(self, params: Params, frozen: Params, model_state: ModelState, x: jax.Array, y: jax.Array,
               cohort: Cohort, round_key: PRNGKey, carry: Any = None, shared: Any = None, rows: Any = None,
               contexts: Any = None, step_budget: jax.Array | None = None,
               positions: jax.Array | None = None) -> RoundSums:
    """Trains every client of ``cohort`` from ``params`` and returns the reduced sums.

    ``cohort`` must already be padded to :meth:`padded_cohort_size` (``FederatedData.cohort(ids,
    pad_clients_to=...)``); padding clients have no examples and weight 0. ``carry`` ([C, ...] per client) and
    ``shared`` (round-wide) are handed to the postprocessing (:class:`ClientContext`). ``rows`` ([C, ...]: each
    client's row, what it keeps across rounds) and ``contexts`` ([C, ...]: each client's hooks'
    :class:`~fedjax_tl.TrainContext`) go to :meth:`LocalTraining.init`; the parts ``row_parts`` of the clients'
    new rows come back in ``RoundSums.client_rows``. ``step_budget`` (int32 [C], or None) caps each client's local
    steps this round (stragglers, :meth:`LocalTraining.init`). ``positions`` (int32 [C], or None for
    ``arange(C)``) is each client's position in the round's cohort (:attr:`ClientContext.position`): a process
    of a multi-process round trains only its part of the cohort, at the clients' positions in the whole cohort
    (:mod:`fedjax_tl.core.multiprocess`).
    """
    c = cohort.size
    if c != self.padded_cohort_size(c):
      raise ValueError(f"Cohort of {c} clients does not split into chunks of {self.schedule.chunk_size}; build "
                       f"it with pad_clients_to={self.padded_cohort_size(c)}.")
    if cohort.indices.shape[1] != self.pad_size:
      raise ValueError(f"Cohort padded to {cohort.indices.shape[1]} examples, runner built for "
                       f"{self.pad_size}.")
    if self.schedule.loop == "scan":
      if self.mesh is not None:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        params, frozen, model_state, x, y, round_key, shared = jax.device_put(
            (params, frozen, model_state, x, y, round_key, shared), replicated)
      return self._round_jit(params, frozen, model_state, x, y, cohort, round_key, carry, shared,
                             (rows, contexts, step_budget), positions)
    return self._round_host(params, frozen, model_state, x, y, cohort, round_key, carry, shared,
                            (rows, contexts, step_budget), positions)

  def _block_exe(self, sig: str, states, frozen, x, y, indices, n_steps: int):
    """The compiled block of ``n_steps`` unrolled steps for this chunk shape, compiled on first use.

    A chunk runs ``steps // unroll`` full blocks, then the remaining steps one at a time, so no step past the
    chunk's last active one is computed. Each executable is compiled only when a chunk first needs it: a
    population whose clients all have fewer than ``unroll`` steps never compiles the unrolled block (a ResNet
    block of 8 steps costs more to compile than a short round costs to run).
    """
    key = (sig, n_steps)
    if key not in self._compiled:
      self._compiled[key] = self._block_jit.lower(states, jnp.int32(0), frozen, x, y, indices, n_steps).compile()
    return self._compiled[key]

  def _round_host(self, params, frozen, model_state, x, y, cohort, round_key, carry, shared, client_in,
                  positions=None):
    c = cohort.size
    k = c if self.schedule.chunk_size == 0 else self.schedule.chunk_size
    u = self.schedule.unroll
    keys = self._client_keys(round_key, cohort.client_ids)
    ctx = ClientContext(cohort.client_ids, _positions(positions, c), self._post_keys(keys), shared)
    active = self.local.active_steps(np.asarray(cohort.num_examples))
    if client_in[2] is not None:  # stragglers: no chunk runs past its clients' budgets
      active = np.minimum(active, np.asarray(client_in[2]))
    acc, metrics, client_rows, carries = None, [], [], []
    for start in range(0, c, k):
      sl = slice(start, start + k)
      indices = cohort.indices[sl]
      states = self._init_jit(params, model_state, keys[sl], cohort.num_examples[sl],
                              jax.tree.map(lambda a, sl=sl: a[sl], client_in), y)
      if self.local.chooses_start:
        states = self._choose_jit(states, frozen, x, y, indices)
      chunk_steps = int(active[sl].max(initial=0))
      full, rest = divmod(chunk_steps, u)
      sig = str((jax.tree.map(lambda a: (a.shape, a.dtype), states), indices.shape, x.shape))
      for b in range(full):
        block = self._block_exe(sig, states, frozen, x, y, indices, u)
        states = block(states, jnp.int32(b * u), frozen, x, y, indices)
      for t in range(full * u, chunk_steps):
        single = self._block_exe(sig, states, frozen, x, y, indices, 1)
        states = single(states, jnp.int32(t), frozen, x, y, indices)
      chunk_ctx = ClientContext(ctx.client_id[sl], ctx.position[sl], ctx.key[sl], shared)
      acc = self._finish_jit(states, params, acc, chunk_ctx, jax.tree.map(lambda a, sl=sl: a[sl], carry))
      metrics.append(acc.client_metrics)
      client_rows.append(acc.client_rows)
      carries.append(acc.client_carry)
    cat = lambda parts: jax.tree.map(lambda *m: jnp.concatenate(m), *parts)
    return acc._replace(client_metrics=cat(metrics),
                        client_rows=cat(client_rows) if self.row_parts else None,
                        client_carry=cat(carries) if carry is not None else None)


def _positions(positions: jax.Array | None, c: int) -> jax.Array:
  """The clients' positions in the round's cohort: ``arange(c)`` unless given (a process's part of the cohort)."""
  return jnp.arange(c, dtype=jnp.int32) if positions is None else jnp.asarray(positions, jnp.int32)


def client_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices; on a multi-host TPU pod after
  ``jax.distributed.initialize()``, all devices of all hosts) with the axis name "clients"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), ("clients",))


def sample_clients(key: PRNGKey, num_clients: int, cohort_size: int) -> np.ndarray:
  """``cohort_size`` distinct client ids, uniformly without replacement (host numpy array)."""
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, {num_clients}] (the number of clients), got {cohort_size}.")
  if cohort_size == num_clients:
    return np.arange(num_clients)
  return np.sort(np.asarray(jax.random.choice(key, num_clients, (cohort_size,), replace=False)))
