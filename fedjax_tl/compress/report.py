"""How big and how fast a model is: parameter counts, storage sizes in several formats, measured latency.

Formats (all counted exactly, in bytes rounded up per format, from the params pytree):
  float32     every parameter as 4 bytes.
  int8        prunable leaves (kernels) as 1 byte per weight plus one float32 scale per output channel (the last
              axis: symmetric per-channel absmax, as :mod:`fedjax_tl.compress.quantize` stores them); other
              leaves float32.
  sparse      prunable leaves in COO form: every nonzero as a float32 value plus its flat index within its leaf
              in ``ceil(log2(leaf size))`` bits; other leaves dense float32.
  sparse_int8 as ``sparse`` with int8 values (plus the per-channel float32 scales).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import numpy as np

from fedjax_tl.compress.pruning import Prunable, is_kernel, prunable_leaves
from fedjax_tl.types import Params

__all__ = ["size_report", "latency_ms", "index_bits", "sparse_bits"]


def index_bits(size: int) -> int:
  """Bits of a flat index into a leaf of ``size`` entries (at least 1)."""
  return max(1, math.ceil(math.log2(max(size, 2))))


def sparse_bits(params: Params, prunable: Prunable = is_kernel, value_bits: int = 32) -> int:
  """Bits of ``params`` in the COO format above: prunable leaves as (value, index) per nonzero, others dense."""
  bits = 0
  for a, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable_leaves(params, prunable))):
    a = np.asarray(a)
    bits += int(np.count_nonzero(a)) * (value_bits + index_bits(a.size)) if f else a.size * 32
  return bits


def size_report(params: Params, prunable: Prunable = is_kernel) -> dict:
  """Counts and sizes of ``params`` (see the module docstring for the formats).

  Returns:
    {"parameters", "prunable", "nonzeros", "prunable_nonzeros", "sparsity" (zeros among prunable weights),
     "float32_bytes", "int8_bytes", "sparse_bytes", "sparse_int8_bytes"}.
  """
  leaves = [np.asarray(a) for a in jax.tree.leaves(params)]
  flags = jax.tree.leaves(prunable_leaves(params, prunable))
  n = sum(a.size for a in leaves)
  n_pr = sum(a.size for a, f in zip(leaves, flags) if f)
  nnz = sum(int(np.count_nonzero(a)) for a in leaves)
  nnz_pr = sum(int(np.count_nonzero(a)) for a, f in zip(leaves, flags) if f)
  dense_other = sum(a.size * 4 for a, f in zip(leaves, flags) if not f)
  scales = sum((a.shape[-1] if a.ndim else 1) * 4 for a, f in zip(leaves, flags) if f)
  return {
      "parameters": n,
      "prunable": n_pr,
      "nonzeros": nnz,
      "prunable_nonzeros": nnz_pr,
      "sparsity": 1.0 - nnz_pr / max(n_pr, 1),
      "float32_bytes": 4 * n,
      "int8_bytes": n_pr + scales + dense_other,
      "sparse_bytes": -(-sparse_bits(params, prunable, 32) // 8),
      "sparse_int8_bytes": -(-sparse_bits(params, prunable, 8) // 8) + scales,
  }


def latency_ms(fn: Callable, *args, runs: int = 20, warmup: int = 2) -> float:
  """Median wall time in milliseconds of ``jax.jit(fn)(*args)`` on the current backend (compiled first, then
  ``warmup`` untimed and ``runs`` timed calls, each waited for with ``block_until_ready``)."""
  if runs < 1:
    raise ValueError(f"runs must be >= 1, got {runs}.")
  f = jax.jit(fn)
  for _ in range(1 + warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))
