"""Magnitude pruning of a params pytree: masks, the Zhu & Gupta sparsity schedule, masked optimizers.

What is prunable. By default only the leaves named ``kernel`` (dense and convolution weights); biases,
BatchNorm/GroupNorm scales and offsets and everything else are never pruned: they are a tiny fraction of the
weights and pruning them hurts accuracy far more than it saves (Han et al. 2015; Zhu & Gupta 2017). Pass
``prunable`` (a predicate on the '/'-joined path and the leaf) to choose otherwise.

Exactness. For a sparsity ``s`` over ``n`` prunable weights exactly ``k = floor(s * n + 1/2)`` weights are
pruned: those with the smallest ``|w|``, ties broken by position (lower flat index first, leaves in the
pytree's flattening order). "global" ranks all prunable weights of the model together (layers end up with
different sparsities); "layer" prunes every prunable leaf to ``s`` on its own.

A mask is a pytree shaped like the params with a bool leaf per param (True = kept); non-prunable leaves are
all True.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.core.checks import check_optimizer
from fedjax_tl.types import OptState, Params

__all__ = ["is_kernel", "prunable_leaves", "magnitude_mask", "apply_mask", "polynomial_sparsity", "masked",
           "keep_pruned", "sparsity", "MaskedState", "KeepPrunedState"]

Prunable = Callable[[str, jax.Array], bool]
SCOPES = ("global", "layer")


def is_kernel(path: str, leaf: jax.Array) -> bool:
  """The default prunable set: weight matrices and convolution kernels (leaves named ``kernel``)."""
  del leaf
  return path.rsplit("/", 1)[-1] == "kernel"


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def prunable_leaves(params: Params, prunable: Prunable = is_kernel) -> Any:
  """A pytree of Python bools shaped like ``params``: which leaves may be pruned."""
  return jax.tree_util.tree_map_with_path(lambda p, a: bool(prunable(_path_str(p), a)), params)


def _keep_top(scores: jax.Array, s) -> jax.Array:
  """Bool mask over the 1-D ``scores`` keeping all but the ``floor(s n + 1/2)`` smallest (stable order)."""
  n = scores.shape[0]
  k = jnp.floor(jnp.asarray(s, jnp.float32) * n + 0.5).astype(jnp.int32)
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank >= k


def magnitude_mask(params: Params, sparsity, *, scope: str = "global", prunable: Prunable = is_kernel) -> Params:
  """The mask that prunes a ``sparsity`` fraction of the prunable weights with the smallest magnitude.

  Args:
    params: the params pytree (any nesting of arrays).
    sparsity: fraction in [0, 1] to prune; may be a traced scalar (e.g. from :func:`polynomial_sparsity`).
    scope: "global" (rank all prunable weights together) or "layer" (every prunable leaf to ``sparsity``).
    prunable: ``(path, leaf) -> bool``; default: leaves named ``kernel``.

  Returns:
    A bool pytree like ``params`` (True = kept). Weights that are already zero are pruned first, so a mask
    computed at a higher sparsity from masked params contains the previous mask's pruned set.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
  if not isinstance(sparsity, jax.Array) and not 0.0 <= float(sparsity) <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {sparsity}.")
  which = prunable_leaves(params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  flags = jax.tree.leaves(which)
  if not any(flags):
    raise ValueError("No prunable leaf in params (the default prunes leaves named 'kernel'); pass prunable= to "
                     "choose which leaves may be pruned.")
  masks = [jnp.ones(a.shape, bool) for a in leaves]
  idx = [i for i, f in enumerate(flags) if f]
  if scope == "layer":
    for i in idx:
      masks[i] = _keep_top(jnp.abs(leaves[i]).reshape(-1).astype(jnp.float32), sparsity).reshape(leaves[i].shape)
  else:
    scores = jnp.concatenate([jnp.abs(leaves[i]).reshape(-1).astype(jnp.float32) for i in idx])
    keep = _keep_top(scores, sparsity)
    start = 0
    for i in idx:
      size = leaves[i].size
      masks[i] = keep[start:start + size].reshape(leaves[i].shape)
      start += size
  return jax.tree.unflatten(treedef, masks)


def apply_mask(params: Params, mask: Params) -> Params:
  """``params`` with the masked-out entries set to zero."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def sparsity(params: Params, prunable: Prunable = is_kernel) -> float:
  """Fraction of exact zeros among the prunable weights."""
  which = jax.tree.leaves(prunable_leaves(params, prunable))
  leaves = [a for a, f in zip(jax.tree.leaves(params), which) if f]
  total = sum(int(a.size) for a in leaves)
  return sum(int((a == 0).sum()) for a in leaves) / max(total, 1)


def polynomial_sparsity(step, final_sparsity: float, *, begin_step: int = 0, end_step: int,
                        frequency: int = 1, initial_sparsity: float = 0.0) -> jax.Array:
  """Gradual pruning schedule of Zhu & Gupta 2017 ("To prune, or not to prune"), eq. (1):

      s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3,   t in {t_0, t_0 + dt, ..., t_0 + n dt},

  with ``t_0 = begin_step``, ``t_0 + n dt = end_step`` and ``dt = frequency``: the sparsity only changes at
  pruning steps (held in between), is ``s_i`` before ``begin_step`` and ``s_f`` from ``end_step`` on. Works on
  Python ints and traced steps.
  """
  if end_step <= begin_step:
    raise ValueError(f"end_step must be after begin_step, got begin_step={begin_step}, end_step={end_step}.")
  if frequency < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}.")
  t = jnp.clip(jnp.asarray(step, jnp.float32), begin_step, end_step)
  t = jnp.minimum(begin_step + jnp.floor((t - begin_step) / frequency) * frequency, end_step)
  frac = (t - begin_step) / (end_step - begin_step)
  return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


class MaskedState(NamedTuple):
  inner: OptState


class KeepPrunedState(NamedTuple):
  inner: OptState
  mask: Params  # bool pytree: the support of the params the optimizer was initialised with


def _zero_masked(updates, mask):
  return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)


def masked(inner: optax.GradientTransformation, mask: Params) -> optax.GradientTransformation:
  """``inner`` whose updates are zero wherever ``mask`` is False, so pruned weights stay exactly zero (also
  under momentum, Adam or weight decay, which would otherwise move them). Unlike ``optax.masked`` (which
  leaves masked leaves' *gradients* as updates), the masked entries get no update at all."""
  check_optimizer(inner, "pruning.masked's inner optimizer")

  def init(params):
    return MaskedState(inner.init(params))

  def update(updates, state, params=None):
    u, s = inner.update(updates, state.inner, params)
    return _zero_masked(u, mask), MaskedState(s)

  return optax.GradientTransformation(init, update)


def keep_pruned(inner: optax.GradientTransformation, prunable: Prunable = is_kernel) -> optax.GradientTransformation:
  """``inner`` that keeps every prunable weight that is zero *at init* at zero.

  The mask is read from the params the optimizer is initialised with: the federated client optimizer is
  initialised from the broadcast model every round, so the support of the (sparse) broadcast is the server's
  mask; no separate mask needs to travel. Non-prunable leaves (e.g. biases initialised at zero) are free.
  """
  check_optimizer(inner, "keep_pruned's inner optimizer")
  def init(params):
    which = prunable_leaves(params, prunable)
    mask = jax.tree.map(lambda p, f: (p != 0) if f else jnp.ones(p.shape, bool), params, which)
    return KeepPrunedState(inner.init(params), mask)

  def update(updates, state, params=None):
    u, s = inner.update(updates, state.inner, params)
    return _zero_masked(u, state.mask), KeepPrunedState(s, state.mask)

  return optax.GradientTransformation(init, update)
