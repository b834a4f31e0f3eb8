"""On-device image preprocessing and augmentation, applied inside the jitted step (no host round-trips)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_tl.types import PRNGKey

__all__ = ["random_crop_flip", "resize", "with_resize"]


def random_crop_flip(key: PRNGKey, x: jax.Array, pad: int = 4) -> jax.Array:
  """Per-example random crop (after ``pad`` pixels of zero padding) and random horizontal flip, the standard
  CIFAR augmentation. Works on any dtype (uint8 stays uint8); x is [B, H, W, C]."""
  b, h, w, _ = x.shape
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (b,))
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(img, off, flip):
    out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jnp.where(flip, out[:, ::-1], out)

  return jax.vmap(one)(padded, offsets, flips)


def resize(x: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of a float batch [B, H, W, C] to [B, size, size, C] (identity when already that size)."""
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bilinear")


def with_resize(preprocess: Callable[[jax.Array], jax.Array], size: int | None) -> Callable[[jax.Array], jax.Array]:
  """``preprocess`` followed by a resize to ``size`` (e.g. CIFAR 32 -> 224 for ImageNet-sized features)."""
  if not size:
    return preprocess
  return lambda x: resize(preprocess(x), size)
