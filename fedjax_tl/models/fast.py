"""The fast CPU path for any model: a program-level rewrite of its convolutions and max pools.

XLA:CPU runs ``conv_general_dilated`` slowly inside loops and under ``vmap`` (a grouped convolution), and the
gradient of a max pool (``select_and_scatter``) slowly everywhere; the library CNN (:mod:`fedjax_tl.models.cnn`)
avoids both by writing its layers as matrix products and reshapes with hand-written gradients. :func:`fast_cpu`
brings the same to any :class:`~fedjax_tl.models.base.Model` without touching its code: its ``apply`` is traced
to a jaxpr and re-evaluated by an interpreter that replaces

* ``conv_general_dilated`` with NHWC/HWIO layout, ``feature_group_count == batch_group_count == 1``, no
  ``lhs_dilation`` (any stride, padding, kernel dilation), by im2col (shifted strided slices) + one matrix
  product, inside a ``jax.custom_vjp`` whose backward pass is two plain matrix products (see
  ``cnn._conv_im2col_bwd``);
* ``reduce_window_max`` with window == stride, no padding or dilation (non-overlapping max pools, e.g.
  ``nn.max_pool(x, (2, 2), (2, 2))``), by a reshape and a max, with the gradient routed to the first maximum of
  each window (as XLA's ``select_and_scatter`` does), from saved argmax indices.

Everything else, and every case above it cannot compute exactly, is left to XLA unchanged; equations inside
``jit`` are rewritten recursively, other higher-order primitives (``scan``, ``cond``, custom derivatives) are
kept as they are. The rewritten program computes the same function (same values, same gradients up to float
rounding); being a ``custom_vjp`` it supports reverse-mode differentiation but not ``jax.jvp``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable  # noqa: F401 (pdoc resolves the inherited Model fields' annotations here)
from typing import Any  # noqa: F401

import flax.linen as nn  # noqa: F401
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_tl.models.base import Model
from fedjax_tl.tree import abstract_init, iter_eqns

__all__ = ["fast_cpu", "FastModel", "rewrite", "rewrite_jaxpr_stats"]

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


# ---- convolution as im2col + matrix product -------------------------------------------------------------------

def _im2col(x: jax.Array, kernel_hw: tuple[int, int], strides, padding, dilation) -> jax.Array:
  """[N, H, W, C] -> [N, Ho, Wo, kh*kw*C]: the patches of a convolution, from padded shifted strided slices."""
  (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  n, h, w, c = x.shape
  ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
  cols = [lax.slice(x, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _conv(x, kernel, strides, padding, dilation):
  """Convolution NHWC x HWIO -> NHWC as im2col + one matrix product, with a hand-written backward pass."""
  kh, kw, _, f = kernel.shape
  to_patches = lambda v: _im2col(v, (kh, kw), strides, padding, dilation)  # noqa: E731

  @jax.custom_vjp
  def conv(x, kernel):
    return to_patches(x) @ kernel.reshape(-1, f)

  def fwd(x, kernel):
    patches, col_vjp = jax.vjp(to_patches, x)
    return patches @ kernel.reshape(-1, f), (patches, kernel, col_vjp)

  def bwd(res, g):
    # The kernel's gradient as (g^T patches)^T: a plain matrix product, where autodiff's transposed-operand form
    # is a slow generic dot on XLA:CPU (cnn._conv_im2col_bwd).
    patches, kernel, col_vjp = res
    dkernel = (g.reshape(-1, f).T @ patches.reshape(-1, patches.shape[-1])).T.reshape(kernel.shape)
    (dx,) = col_vjp(g @ kernel.reshape(-1, f).T)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)

  conv.defvjp(fwd, bwd)
  return conv(x, kernel)


def _conv_supported(eqn, x, kernel) -> bool:
  p = eqn.params
  dn = p["dimension_numbers"]
  return (x.ndim == 4 and kernel.ndim == 4 and (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == _NHWC
          and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
          and tuple(p["lhs_dilation"]) == (1, 1) and p.get("preferred_element_type") is None
          and x.dtype == kernel.dtype and jnp.issubdtype(x.dtype, jnp.floating))


def _conv_is_faster(eqn, x, kernel) -> bool:
  """Where the matrix-product form measured faster than XLA's convolution on CPU: every supported case measured.
  ``experiments/bench_fast_conv.py`` (2-core XLA:CPU, forward + backward at batch 32 inside ``lax.scan``):
  3x3 stride 1 28-55x, 3x3 stride 2 71x (inside a loop body XLA:CPU's convolution is the slow generic one).
  Whole models (``experiments/benchmark.py``): the plain workload-P CNN 2.8-4.2x, ResNet18 (CIFAR stem, its 1x1
  strided shortcuts included) 1.30x over XLA's convolutions in their best schedule (``sequential/host:8``)."""
  del eqn, x, kernel
  return True


def _rewrite_conv(eqn, x, kernel):
  p = eqn.params
  out = _conv(x, kernel, tuple(p["window_strides"]), tuple(tuple(q) for q in p["padding"]),
              tuple(p["rhs_dilation"]))
  return out


# ---- non-overlapping max pooling as reshape + max --------------------------------------------------------------

def _pool_supported(eqn, x) -> bool:
  p = eqn.params
  return (tuple(p["window_dimensions"]) == tuple(p["window_strides"])
          and all(tuple(q) == (0, 0) for q in p["padding"])
          and all(d == 1 for d in p["base_dilation"]) and all(d == 1 for d in p["window_dilation"])
          and jnp.issubdtype(x.dtype, jnp.floating))


def _max_pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """reduce_window_max with window == stride, 'VALID' (a trailing partial window is dropped)."""
  nd = x.ndim
  out = tuple(s // w for s, w in zip(x.shape, window))
  k = math.prod(window)

  def windows(v):  # [..., o_i, ...] x window -> [o_1, ..., o_n, K]
    v = v[tuple(slice(0, o * w) for o, w in zip(out, window))]
    v = v.reshape([d for o, w in zip(out, window) for d in (o, w)])
    return v.transpose([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]).reshape(*out, k)

  @jax.custom_vjp
  def pool(x):
    return windows(x).max(axis=-1)

  def fwd(x):
    wv = windows(x)
    return wv.max(axis=-1), jnp.argmax(wv, axis=-1).astype(jnp.int8 if k < 128 else jnp.int32)

  def bwd(arg, g):
    hot = jnp.where(arg[..., None] == jnp.arange(k, dtype=arg.dtype), g[..., None], jnp.zeros((), g.dtype))
    dx = hot.reshape(*out, *window).transpose([i for j in range(nd) for i in (j, nd + j)])
    dx = dx.reshape([o * w for o, w in zip(out, window)])
    return (lax.pad(dx, jnp.zeros((), dx.dtype), [(0, s - o * w, 0) for s, o, w in zip(x.shape, out, window)]),)

  pool.defvjp(fwd, bwd)
  return pool(x)


def _rewrite_pool(eqn, x):
  window = tuple(eqn.params["window_dimensions"])
  if all(w == 1 for w in window):
    return x
  return _max_pool(x, window)


# ---- the interpreter -------------------------------------------------------------------------------------------

def _is_jaxpr(v) -> bool:
  return hasattr(v, "jaxpr") and hasattr(v, "consts")


def _contains_target(jaxpr) -> bool:
  return any(e.primitive.name in ("conv_general_dilated", "reduce_window_max") for e in iter_eqns(jaxpr))


def _eval(jaxpr, consts, args, stats):
  env = {}

  def read(v):
    return v.val if type(v).__name__ == "Literal" else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    outvals = None
    if name == "conv_general_dilated" and _conv_supported(eqn, *invals) and _conv_is_faster(eqn, *invals):
      outvals = [_rewrite_conv(eqn, *invals)]
      stats["conv"] = stats.get("conv", 0) + 1
    elif name == "reduce_window_max" and _pool_supported(eqn, *invals):
      outvals = [_rewrite_pool(eqn, *invals)]
      stats["max_pool"] = stats.get("max_pool", 0) + 1
    elif name in ("pjit", "jit") and _contains_target(eqn.params["jaxpr"].jaxpr):
      inner = eqn.params["jaxpr"]
      outvals = _eval(inner.jaxpr, inner.consts, invals, stats)
    if outvals is None:
      with eqn.ctx.manager:
        ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = ans if eqn.primitive.multiple_results else [ans]
    for var, val in zip(eqn.outvars, outvals):
      if type(var).__name__ != "DropVar":
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def rewrite(fn, stats: dict | None = None):
  """``fn`` (a function of pytrees of arrays) with its convolutions and non-overlapping max pools rewritten as
  described in the module docstring. ``stats``, if given, counts the rewritten equations by kind."""

  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)),
                                       return_shape=True)(*flat)
    out = _eval(closed.jaxpr, closed.consts, flat, stats if stats is not None else {})
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def rewrite_jaxpr_stats(model: Model) -> dict:
  """How many convolutions and max pools the rewrite replaces in ``model``'s training forward pass (traced
  abstractly on one example)."""
  params, state = abstract_init(model)
  x = jax.ShapeDtypeStruct((1, *model.sample_shape), model.sample_dtype)
  mask = jax.ShapeDtypeStruct((1,), jnp.bool_)
  stats: dict = {}
  fn = lambda p, s, xb, m: Model.apply(model, p, s, xb, train=True, mask=m)  # noqa: E731
  jax.eval_shape(rewrite(fn, stats), params, state, x, mask)
  return stats


@dataclasses.dataclass(frozen=True)
class FastModel(Model):
  """A :class:`Model` whose ``apply`` runs the rewritten program (see :func:`fast_cpu`). Equal (and hashing
  equal) to another ``FastModel`` of the same fields, so jitted programs keyed on it are shared."""

  def apply(self, params, state, x, *, train: bool, mask=None, rng=None):
    fn = lambda p, s, xb, m, r: Model.apply(self, p, s, xb, train=train, mask=m, rng=r)  # noqa: E731
    return rewrite(fn)(params, state, x, mask, rng)


def fast_cpu(model: Model) -> Model:
  """``model`` with its convolutions as matrix products and its non-overlapping max pools as reshape-max (same
  params, same function, same gradients), the layers XLA:CPU runs fast; see the module docstring. Idempotent."""
  if isinstance(model, FastModel):
    return model
  if type(model) is not Model:  # a Model subclass with its own apply: keep its behaviour
    return model
  return FastModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def unwrap(model: Model) -> Model:
  """The plain model a :func:`fast_cpu` model was made from (itself otherwise)."""
  if isinstance(model, FastModel):
    return Model(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
  return model
