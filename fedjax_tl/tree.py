"""The floor's tree helpers, imported by every layer above (models, transforms, aggregators, core) and importing
none of them: the one way bits are counted, a model's abstract init, and a walk over a traced program.

* :func:`tree_bits` - what sending a pytree dense costs, in bits (every size in the library is counted with it:
  uplink, downlink, the hooks' messages, BatchNorm statistics).
* :func:`abstract_init` - a model's ``init`` traced abstractly (shapes and dtypes only), cached per model.
* :func:`iter_eqns` - every equation of a jaxpr and of the jaxprs nested in it (for the CPU fast path's rewrite
  and the schedule's "does this model run XLA convolutions" question).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_tl.types import PyTree

__all__ = ["tree_bits", "abstract_init", "iter_eqns", "cached"]


def tree_bits(tree: PyTree) -> int:
  """Bits of a pytree of arrays (or ShapeDtypeStructs) sent dense: 8 x the bytes of each leaf's dtype."""
  return sum(8 * jnp.dtype(a.dtype).itemsize * math.prod(a.shape) for a in jax.tree.leaves(tree))


def cached(fn: Callable) -> Callable:
  """``functools.cache`` of a function of a model (or any value hashed by its configuration), computed uncached
  for an unhashable one (e.g. a module with a list field)."""
  memo = functools.cache(fn)

  @functools.wraps(fn)
  def call(*args):
    try:
      return memo(*args)
    except TypeError as e:
      if "unhashable" not in str(e):
        raise
      return fn(*args)

  call.cache_clear = memo.cache_clear
  return call


@cached
def abstract_init(model: Any) -> tuple[PyTree, PyTree]:
  """(params, model state) of ``model.init`` as ShapeDtypeStructs, from an abstract trace (nothing computed or
  compiled), cached per model. ``model`` is a :class:`~fedjax_tl.models.base.Model` (anything whose
  ``init(key)`` returns the pair)."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0))


def iter_eqns(jaxpr) -> Iterator[Any]:
  """Every equation of ``jaxpr`` and, recursively, of the jaxprs inside it (jit, scan, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for item in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
          yield from iter_eqns(item.jaxpr)
        elif hasattr(item, "eqns"):  # Jaxpr
          yield from iter_eqns(item)
