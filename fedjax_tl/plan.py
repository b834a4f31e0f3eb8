"""Will it fit? Compile a federated round for a TPU target ahead of time, without the hardware.

With libtpu installed (``pip install -e ".[tpu]"``; no TPU needed), ``jax.experimental.topologies`` describes a
TPU slice whose devices can hold shardings, and ``jax.jit(...).lower(ShapeDtypeStructs).compile()`` runs the real
TPU compiler on this machine. Its ``memory_analysis()`` (per device: arguments + outputs - aliased + temporaries
+ code) says whether the round fits the chip's HBM, and ``cost_analysis()`` gives its FLOPs, so a user knows the
chunk size that fits before paying for the TPU.

:func:`plan_round` compiles :class:`~fedjax_tl.core.execution.CohortRunner`'s round (the program
``FedAvg.apply`` runs) for one cohort size: the whole cohort vmapped in one program (the accelerator default)
when it fits ``hbm_fraction`` of the device's memory, else ``chunked:K`` with the largest K that fits. Every
candidate K is compiled: between the largest K known to fit and the smallest known not to, the next guess
interpolates linearly (memory is close to ``a + b K`` for large K, but not for small K on TPU, whose compiler
keeps small temporaries out of HBM); the result is balanced into equal chunks.

The target is an explicit input everywhere: code that asks ``jax.default_backend()`` while tracing sees the host
(``cpu``) when compiling for a TPU, so schedules and layers are chosen for the target, not the host (e.g.
:func:`~fedjax_tl.core.execution.default_schedule` is called with the target's platform; a ``CNN`` must be given
``conv="xla"`` explicitly, and ``LocalTraining``'s CPU fast path is turned off for the plan).

FLOPs: XLA's cost analysis counts a loop body once, so the round's FLOPs are the compiled program's count times
the trip counts (chunks x local steps); the per-client initialisation and aggregation are counted that many
times too (a small overestimate for a ResNet). The time bound divides by the device's peak bfloat16 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.execution import CohortRunner, Schedule, default_schedule
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.params import split_params
from fedjax_tl.data.client_data import Cohort
from fedjax_tl.tree import abstract_init

__all__ = ["Target", "TARGETS", "PlanError", "target_devices", "compile_round", "plan_round", "TPU_INSTALL_HINT"]

TPU_INSTALL_HINT = ('pip install -e ".[tpu]"   (brings libtpu, ~700 MB; it compiles for TPU targets on a machine '
                    'without a TPU)')
GiB = 1 << 30


class PlanError(ValueError):
  """A target or plan that cannot be made; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A compilation target: a TPU topology (or this host's devices) and what each device holds and computes.

  Attributes:
    name: the name used on the command line (e.g. "v5e-1").
    topology: the ``jax.experimental.topologies`` name ("v5e:1x1"), or "host" for this machine's devices.
    hbm_bytes: memory per device (a TensorCore's HBM share on v2, a chip elsewhere).
    peak_flops: peak bfloat16 FLOP/s per device.
    note: where it is found (Colab's runtime types, Cloud slices).
  """

  name: str
  topology: str
  hbm_bytes: int
  peak_flops: float
  note: str = ""

  @property
  def platform(self) -> str:
    return jax.default_backend() if self.topology == "host" else "tpu"


# Public figures per device (Google Cloud TPU docs): v2 8 GiB and 22.5 TFLOP/s per TensorCore (a v2 chip has
# two, each its own JAX device); v5e 16 GiB, 197 TFLOP/s per chip; v6e (Trillium) 32 GiB, 918 TFLOP/s per chip.
# v5e's usable HBM is what its compiler reports when a program does not fit ("available HBM (15.75G)").
TARGETS: dict[str, Target] = {
    t.name: t for t in [
        Target("v2-8", "v2:2x2", 8 * GiB, 22.5e12, "Colab's 'TPU v2' runtime: 4 chips, 8 TensorCores"),
        Target("v5e-1", "v5e:1x1", int(15.75 * GiB), 197e12, "Colab's 'v5e-1 TPU' runtime: one chip"),
        Target("v5e-4", "v5e:2x2", int(15.75 * GiB), 197e12, "Cloud v5litepod-4"),
        Target("v5e-8", "v5e:2x4", int(15.75 * GiB), 197e12, "Cloud v5litepod-8"),
        Target("v6e-1", "v6e:1x1", 32 * GiB, 918e12, "Colab's 'v6e-1 TPU' runtime: one chip"),
        Target("v6e-4", "v6e:2x2", 32 * GiB, 918e12, "Cloud v6e-4"),
        Target("v6e-8", "v6e:2x4", 32 * GiB, 918e12, "Cloud v6e-8"),
    ]
}


def _host_target(memory_bytes: int | None) -> Target:
  mem = memory_bytes or int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  return Target("host", "host", mem, float("nan"), "this machine's devices (for tests and CPU planning)")


def resolve_target(target: str | Target, memory_bytes: int | None = None) -> Target:
  """A :class:`Target` from its name ("v5e-1", ..., or "host"); ``memory_bytes`` overrides the memory per
  device (for "host" it defaults to a quarter of the RAM)."""
  if isinstance(target, Target):
    t = target
  elif target == "host":
    t = _host_target(memory_bytes)
  elif target in TARGETS:
    t = TARGETS[target]
  else:
    raise PlanError(f"Unknown target {target!r}; choose one of {sorted(TARGETS)} or 'host'. (Cloud names such as "
                    "'v5litepod-4' are spelled 'v5e-4' here.)")
  if memory_bytes and t.topology != "host":
    t = dataclasses.replace(t, hbm_bytes=int(memory_bytes))
  return t


def target_devices(target: Target) -> list:
  """The target's devices: this host's for "host", else a TPU topology's (needs libtpu, no TPU)."""
  if target.topology == "host":
    return list(jax.devices())
  try:
    import libtpu  # noqa: F401 - only to give the install hint instead of a backend error
  except ImportError:
    raise PlanError(f"Planning for {target.name} compiles with the TPU compiler, which comes with libtpu: "
                    f"{TPU_INSTALL_HINT}.") from None
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a second process compiling at once
  from jax.experimental import topologies

  kwargs = {"chips_per_host_bounds": (1, 1, 1)} if target.topology.endswith(":1x1") else {}
  return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs).devices)


def _abstract(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_round(local: LocalTraining | FedAvg, devices: Sequence, *, cohort_size: int, pad_size: int,
                  num_train: int, schedule: Schedule, trainable: str | None = None) -> dict:
  """Compiles one round of ``local`` training for ``cohort_size`` clients of ``pad_size`` examples each (from
  a training set of ``num_train`` examples kept on device) under ``schedule`` on ``devices``; nothing runs.
  Given a :class:`~fedjax_tl.FedAvg` instead, compiles that algorithm's own round: its hooks (their broadcast,
  per-client state and messages), per-client rows, client transform and aggregator encoding, its trainable part.

  Returns the compiler's figures per device: ``bytes`` (arguments + outputs - aliased + temporaries + code),
  its parts, ``flops`` (loop bodies once, as XLA counts), ``compile_s``. A program too large for the compiler
  raises its error (RESOURCE_EXHAUSTED).
  """
  if schedule.loop != "scan":
    raise PlanError(f"Only one-program schedules (loop 'scan') can be compiled ahead of time, got {schedule}.")
  n_dev = len(devices)
  algo = local if isinstance(local, FedAvg) else None
  if algo is not None:
    local, trainable = algo.local, algo.trainable
  # The target's platform, not this host's: the schedule resolves the CPU fast path against it (off for a TPU).
  schedule = dataclasses.replace(schedule, platform=devices[0].platform)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("clients",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  model = local.model
  params, state = abstract_init(model)
  train, frozen = split_params(params, trainable)
  if algo is None:
    runner = CohortRunner(local, schedule, pad_size, mesh=mesh if n_dev > 1 else None)
  else:
    runner = algo.make_runner(pad_size, local=local, schedule=schedule, mesh=mesh if n_dev > 1 else None)
  c = runner.padded_cohort_size(cohort_size)
  cohort = Cohort(jax.ShapeDtypeStruct((c,), jnp.int32), jax.ShapeDtypeStruct((c, pad_size), jnp.int32),
                  jax.ShapeDtypeStruct((c,), jnp.int32))
  x = jax.ShapeDtypeStruct((num_train, *model.sample_shape), model.sample_dtype)
  y = jax.ShapeDtypeStruct((num_train,), jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  extra = (None, None)
  if algo is not None:  # the algorithm's own inputs: its state's trainable part, rows, contexts, aggregator
    server, own, contexts, carry = jax.eval_shape(lambda p, s: algo.round_inputs(p, s, c), params, state)
    train, frozen, state = server.params, server.frozen, server.model_state
    agg_state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), server.aggregator_state)
    shared, _ = algo.aggregator.setup(agg_state, c, c, float(pad_size), jax.random.PRNGKey(0))
    extra = _abstract((carry, (agg_state, shared), (own, contexts, None)), replicated)
  args = _abstract((train, frozen, state, x, y, cohort, key), replicated)
  t = time.perf_counter()
  compiled = runner._round_jit.lower(*args, *extra).compile()  # noqa: SLF001 - the round's program itself
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  parts = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
  total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"bytes": total, **{f"{k}_bytes": v for k, v in parts.items()}, "flops": float(cost.get("flops", 0.0)),
          "compile_s": compile_s, "padded_cohort": c, "chunk_size": schedule.chunk_size or c,
          "num_steps": runner.num_steps}


def _fits(result: dict | None, budget: int) -> bool:
  return result is not None and not result.get("oom") and result["bytes"] <= budget


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _try(fn: Callable[[], dict], log) -> dict | None:
  """``fn()``; when the compiler refuses the program for lack of memory, None, or ``{"oom": True, "bytes": b}``
  with the temporaries' size its message names (a lower bound on what the program needs, used to interpolate)."""
  try:
    return fn()
  except Exception as e:  # the compiler's out-of-memory error: does not fit
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower():
      log(f"    does not compile within the device memory: {msg.splitlines()[0][:160]}")
      m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", msg)
      return {"oom": True, "bytes": int(float(m.group(1)) * _UNITS[m.group(2)])} if m else None
    raise


def plan_round(local: LocalTraining | FedAvg, target: str | Target, *, cohort_size: int, pad_size: int, num_train: int,
               trainable: str | None = None, schedule: str | Schedule = "auto", hbm_fraction: float = 0.9,
               memory_bytes: int | None = None, max_compiles: int = 6, log=print) -> dict:
  """The schedule for ``cohort_size`` clients per round on ``target`` and what it needs per device: of plain
  local training (a :class:`LocalTraining`), or of an algorithm's own round (a :class:`~fedjax_tl.FedAvg`: its
  hooks, per-client rows, transforms and aggregator, :func:`compile_round`).

  ``schedule="auto"``: the target platform's default (one program, whole cohort vmapped) if it fits
  ``hbm_fraction`` of the device memory, else the largest balanced ``chunked:K`` that fits (K a multiple of
  the device count, found with at most ``max_compiles`` more compiles, each guess verified by compiling it).
  An explicit schedule is compiled as given. Returns a row:
  target, cohort, schedule, bytes per device and fraction of HBM, FLOPs per round (all devices), the lower
  bound on round time at peak, compile seconds, ``fits``.
  """
  if not 0 < hbm_fraction <= 1:
    raise PlanError(f"hbm_fraction must be in (0, 1], got {hbm_fraction}.")
  tgt = resolve_target(target, memory_bytes)
  devices = target_devices(tgt)
  n_dev = len(devices)
  budget = int(hbm_fraction * tgt.hbm_bytes)
  steps = (local.local if isinstance(local, FedAvg) else local).num_steps(pad_size)

  def compile_k(k: int) -> dict | None:
    sched = dataclasses.replace(base, chunk_size=k)
    log(f"  {tgt.name}: compiling {cohort_size} clients as {sched} ({n_dev} device(s)) ...")
    r = _try(lambda: compile_round(local, devices, cohort_size=cohort_size, pad_size=pad_size,
                                   num_train=num_train, schedule=sched, trainable=trainable), log)
    if r is not None and not r.get("oom"):  # (a refused program was reported by _try)
      log(f"    {r['bytes'] / GiB:.2f} GiB per device, compiled in {r['compile_s']:.0f}s")
    return r

  if isinstance(schedule, str):
    base = Schedule.parse(schedule) if schedule != "auto" else default_schedule(tgt.platform)
    if schedule == "auto" and base.loop != "scan":  # the CPU default is a host loop: plan its one-program form
      base = Schedule(0, "scan", 1)
  else:
    base = schedule
  auto = schedule == "auto"
  if base.chunk_size == -1:
    auto, base = True, dataclasses.replace(base, chunk_size=0)
  full = math.ceil(cohort_size / n_dev) * n_dev  # the whole cohort as one chunk
  probes: dict[int, dict | None] = {}

  def probe(k: int) -> dict | None:
    if k not in probes:
      probes[k] = compile_k(0 if k >= full and base.chunk_size == 0 else k)
    return probes[k]

  result = probe(full if base.chunk_size == 0 else base.chunk_size)
  if auto and not _fits(result, budget) and full > n_dev:
    # The largest chunk K (a multiple of the device count) whose compiled round fits: memory is close to
    # a + b K for large K, but not below (the TPU compiler keeps small temporaries out of HBM), so interpolate
    # between the largest K known to fit and the smallest known not to, and verify every guess by compiling.
    lo, hi = n_dev, full
    if not _fits(probe(lo), budget):
      result = probes[lo] if probes[lo] is not None and not probes[lo].get("oom") else None
    else:
      for _ in range(max_compiles):
        if hi - lo <= n_dev:
          break
        r_lo, r_hi = probes[lo], probes.get(hi)
        if r_hi is not None and r_hi["bytes"] > r_lo["bytes"]:
          k = lo + (budget - r_lo["bytes"]) * (hi - lo) / (r_hi["bytes"] - r_lo["bytes"])
        else:
          k = (lo * hi) ** 0.5  # the compiler gave up on hi: bisect geometrically
        k = min(max(int(k) // n_dev * n_dev, lo + n_dev), hi - n_dev)
        if _fits(probe(k), budget):
          lo = k
        else:
          hi = k
      # Equal chunks: as many chunks as lo needs, as small as they can be (less padding), if that fits too.
      chunks = math.ceil(cohort_size / lo)
      k = math.ceil(math.ceil(cohort_size / chunks) / n_dev) * n_dev
      result = probe(k) if _fits(probe(k), budget) else probes[lo]
  tried = sorted(probes.items())
  if result is None or result.get("oom"):
    need = result["bytes"] if result else None
    return {"target": tgt.name, "devices": n_dev, "cohort": cohort_size, "schedule": str(base), "fits": False,
            "bytes_per_device": None, "hbm_fraction": None, "temporaries_needed_bytes": need,
            "note": "the compiler ran out of device memory even for the smallest chunk"}
  k = result["chunk_size"]
  chunks = result["padded_cohort"] // k
  flops_round = result["flops"] * chunks * steps * n_dev
  row = {
      "target": tgt.name, "devices": n_dev, "cohort": cohort_size, "local_steps": steps,
      "schedule": str(dataclasses.replace(base, chunk_size=0 if k == result["padded_cohort"] and
                                          base.chunk_size == 0 else k)),
      "chunk_size": k, "chunks": chunks, "bytes_per_device": result["bytes"],
      "hbm_fraction": result["bytes"] / tgt.hbm_bytes, "fits": _fits(result, budget),
      "flops_per_round": flops_round,
      "min_round_ms": 1e3 * flops_round / (tgt.peak_flops * n_dev) if tgt.peak_flops == tgt.peak_flops else None,
      "compile_s": result["compile_s"], "temp_bytes": result["temp_bytes"],
      "argument_bytes": result["argument_bytes"],
      "probes": [{"chunk_size": kk, "bytes": r["bytes"] if r else None, "oom": bool(r and r.get("oom"))}
                 for kk, r in tried],
  }
  return row
