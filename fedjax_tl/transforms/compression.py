"""Compression of client updates as update transforms, each declaring the exact size of its encoding.

Every compressor returns the *decoded* update (what the server reconstructs), so it composes with the rest of
the round unchanged, and declares ``encoded_bits(template)``: the number of bits a real client would put on
the wire for an update of that shape. Sizes are static (fixed-length codes), so they are exact, not estimates:

=================  ===================================================  ===========================================
compressor         what is sent                                         bits
=================  ===================================================  ===========================================
``qsgd(b)``        per bucket of ``bucket_size``: float32 L2 norm;       sum over leaves: n*b + 32*ceil(n/bucket)
                   per coordinate: sign + (b-1)-bit level in 0..2^(b-1)-1
``int8()``         per leaf: float32 scale; per coordinate: int8         sum over leaves: 8n + 32
``top_k(f)``       k = max(1, round(f*d)) (index, float32 value) pairs   k * (32 + ceil(log2 d))
                   of the whole update (d coordinates)
``random_k(f)``    k float32 values at indices drawn from a 64-bit seed  32k + 64
``scaled_sign()``  per leaf: float32 mean |v|; per coordinate: sign bit  sum over leaves: n + 32
=================  ===================================================  ===========================================

``qsgd`` is unbiased (Alistarh et al. 2017, "QSGD"), as is ``random_k(rescale=True)``; ``int8`` is
deterministic round-to-nearest. ``top_k``, ``random_k`` (unscaled) and ``scaled_sign`` are biased and meant to
be wrapped in :func:`error_feedback` (Stich et al. 2018, "Sparsified SGD with memory"; Karimireddy et al.
2019, "Error feedback fixes SignSGD"), whose per-client residual persists across rounds.

:func:`parse` turns command-line text into a compressor: ``none``, ``int8``, ``qsgd:B``, ``topk:F``,
``randk:F``, ``sign``; the biased ones get error feedback unless ``/noef`` is appended.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_tl.transforms.base import UpdateTransform, stateless
from fedjax_tl.types import Updates

__all__ = ["qsgd", "int8", "top_k", "random_k", "scaled_sign", "error_feedback", "parse", "COMPRESSORS"]


def _num_coords(template: Updates) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(template))


def _per_leaf(fn):
  """Applies ``fn(leaf_f32, key)`` to every leaf with its own key, keeping dtypes."""

  def apply(updates, key):
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [fn(u.astype(jnp.float32), k).astype(u.dtype) for u, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)

  return apply


def qsgd(bits: int, bucket_size: int = 512) -> UpdateTransform:
  """Unbiased stochastic quantization to ``bits`` bits per coordinate (QSGD with s = 2^(bits-1) - 1 levels).

  Each bucket of ``bucket_size`` consecutive coordinates of a leaf is scaled by its L2 norm; a coordinate
  ``v`` becomes ``norm * sign(v) * l / s`` with ``l`` the level below ``s|v|/norm`` or the one above, chosen
  with the probabilities that make the expectation exactly ``v``.
  """
  if bits < 2:
    raise ValueError(f"qsgd needs bits >= 2 (one sign bit plus at least one level bit), got {bits}.")
  if bucket_size < 1:
    raise ValueError(f"bucket_size must be >= 1, got {bucket_size}.")
  s = 2 ** (bits - 1) - 1

  def leaf(u, key):
    flat = u.reshape(-1)
    n = flat.shape[0]
    nb = -(-n // bucket_size)
    b = jnp.pad(flat, (0, nb * bucket_size - n)).reshape(nb, bucket_size)
    norm = jnp.linalg.norm(b, axis=1, keepdims=True)
    r = jnp.abs(b) / jnp.where(norm > 0, norm, 1.0) * s
    low = jnp.floor(r)
    level = low + (jax.random.uniform(key, b.shape) < r - low)
    q = jnp.sign(b) * norm * level / s
    return q.reshape(-1)[:n].reshape(u.shape)

  def size(template):
    return sum(int(a.size) * bits + 32 * -(-int(a.size) // bucket_size) for a in jax.tree.leaves(template))

  return stateless(_per_leaf(leaf), size)


def int8() -> UpdateTransform:
  """Deterministic uniform quantization of every leaf to int8 with a float32 scale max|v| / 127."""

  def leaf(u, key):
    del key
    scale = jnp.max(jnp.abs(u)) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(u / safe), -127, 127) * scale

  return stateless(_per_leaf(leaf), lambda t: sum(8 * int(a.size) + 32 for a in jax.tree.leaves(t)))


def _num_kept(fraction: float, d: int) -> int:
  return min(d, max(1, round(fraction * d)))


def _check_fraction(fraction: float) -> None:
  if not 0 < fraction <= 1:
    raise ValueError(f"The kept fraction must be in (0, 1], got {fraction}.")


def top_k(fraction: float) -> UpdateTransform:
  """Keeps the k = round(fraction * d) largest-magnitude coordinates of the whole update, zeroes the rest."""
  _check_fraction(fraction)

  def fn(updates, key):
    del key
    flat, unravel = ravel_pytree(updates)
    k = _num_kept(fraction, flat.shape[0])
    if k == flat.shape[0]:
      return updates
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return unravel(jnp.zeros_like(flat).at[idx].set(flat[idx]))

  def size(template):
    d = _num_coords(template)
    return _num_kept(fraction, d) * (32 + max(1, math.ceil(math.log2(d))))

  return stateless(fn, size)


def random_k(fraction: float, rescale: bool = False) -> UpdateTransform:
  """Keeps k = round(fraction * d) coordinates chosen uniformly without replacement (indices follow from a
  seed shared with the server). ``rescale`` multiplies them by d / k, which makes the result unbiased."""
  _check_fraction(fraction)

  def fn(updates, key):
    flat, unravel = ravel_pytree(updates)
    d = flat.shape[0]
    k = _num_kept(fraction, d)
    if k == d:
      return updates
    idx = jax.random.choice(key, d, (k,), replace=False)
    kept = flat[idx] * (d / k if rescale else 1.0)
    return unravel(jnp.zeros_like(flat).at[idx].set(kept.astype(flat.dtype)))

  return stateless(fn, lambda t: 32 * _num_kept(fraction, _num_coords(t)) + 64)


def scaled_sign() -> UpdateTransform:
  """Every leaf becomes mean(|v|) * sign(v) (sign of 0 sent as +): one bit per coordinate plus a scale."""

  def leaf(u, key):
    del key
    return jnp.mean(jnp.abs(u)) * jnp.where(u >= 0, 1.0, -1.0)

  return stateless(_per_leaf(leaf), lambda t: sum(int(a.size) + 32 for a in jax.tree.leaves(t)))


def error_feedback(compressor: UpdateTransform) -> UpdateTransform:
  """Error feedback around a stateless compressor: send C(u + e), keep the residual e <- u + e - C(u + e).

  The state (the residual, float32, shaped like the update) belongs to one client and persists across its
  rounds, so over any number of rounds sum(sent) = sum(updates) - e_final exactly (up to float rounding).
  """

  def init(updates):
    return jax.tree.map(lambda u: jnp.zeros(u.shape, jnp.float32), updates)

  def apply(updates, residual, key):
    corrected = jax.tree.map(lambda u, e: u.astype(jnp.float32) + e, updates, residual)
    sent, _ = compressor.apply(corrected, compressor.init(corrected), key)
    new_residual = jax.tree.map(jnp.subtract, corrected, sent)
    return jax.tree.map(lambda s, u: s.astype(u.dtype), sent, updates), new_residual

  return UpdateTransform(init, apply, compressor.encoded_bits)


COMPRESSORS = ("none", "int8", "qsgd:B", "topk:F", "randk:F", "sign")


def parse(spec: str | None) -> UpdateTransform | None:
  """``none`` | ``int8`` | ``qsgd:BITS`` | ``topk:FRACTION`` | ``randk:FRACTION`` | ``sign``, optionally followed
  by ``/ef`` or ``/noef``. top-k, random-k and sign default to error feedback; int8 and qsgd to none.
  ``randk:F/unbiased`` rescales by d/k instead (no error feedback). Returns None for ``none``."""
  if spec is None or spec.strip().lower() in ("", "none"):
    return None
  text = spec.strip().lower()
  name, _, modifier = text.partition("/")
  name, _, arg = name.partition(":")
  if modifier not in ("", "ef", "noef", "unbiased") or (modifier == "unbiased" and name != "randk"):
    raise ValueError(f"Unknown compression modifier in {spec!r}: use /ef or /noef (or randk:F/unbiased).")
  try:
    if name == "int8" and not arg:
      c, ef = int8(), False
    elif name == "qsgd":
      c, ef = qsgd(int(arg)), False
    elif name == "topk":
      c, ef = top_k(float(arg)), True
    elif name == "randk":
      c, ef = random_k(float(arg), rescale=modifier == "unbiased"), modifier != "unbiased"
    elif name == "sign" and not arg:
      c, ef = scaled_sign(), True
    else:
      raise KeyError(name)
  except (KeyError, ValueError) as e:
    raise ValueError(f"Cannot parse compression {spec!r} ({e}); expected one of {COMPRESSORS}, e.g. 'topk:0.01', "
                     "'qsgd:4', 'int8', 'sign/noef'.") from None
  if modifier == "ef":
    ef = True
  elif modifier == "noef":
    ef = False
  return error_feedback(c) if ef else c
