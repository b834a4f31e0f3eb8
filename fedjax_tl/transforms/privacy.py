"""Differential privacy as update transforms: per-client L2 clipping and Gaussian noise on the aggregate.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"): each client's
delta is clipped to L2 norm ``clip``; the server averages the clipped deltas with *uniform* weights over the
expected cohort size m (so one client changes the mean by at most clip / m) and adds Gaussian noise with
std ``noise_multiplier * clip / m`` to every coordinate of the mean. Privacy accounting:
:mod:`fedjax_tl.privacy.accounting`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.transforms.base import UpdateTransform, stateless

__all__ = ["clip_l2", "gaussian_noise", "dp_fedavg", "clip_by_norm", "add_noise"]


def clip_by_norm(updates, clip):
  """(updates scaled to global L2 norm <= clip, their norm before clipping); ``clip`` may be traced."""
  norm = optax.tree.norm(updates)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), norm


def add_noise(updates, std, key):
  """Independent N(0, std^2) noise on every coordinate, each leaf with its own key; ``std`` may be traced."""
  leaves, treedef = jax.tree.flatten(updates)
  keys = jax.random.split(key, max(len(leaves), 1))
  noisy = [(u + std * jax.random.normal(k, u.shape, jnp.float32)).astype(u.dtype) for u, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def clip_l2(clip: float) -> UpdateTransform:
  """Scales the whole update down to global L2 norm <= ``clip`` (unchanged if already within)."""
  if not clip > 0:
    raise ValueError(f"clip must be > 0, got {clip}.")
  return stateless(lambda updates, key: clip_by_norm(updates, clip)[0])


def gaussian_noise(std: float) -> UpdateTransform:
  """Adds independent N(0, std^2) noise to every coordinate."""
  if std < 0:
    raise ValueError(f"noise std must be >= 0, got {std}.")
  return stateless(lambda updates, key: add_noise(updates, std, key))


def dp_fedavg(clip: float, noise_multiplier: float, cohort_size: int) -> tuple[UpdateTransform, UpdateTransform]:
  """(client transform, server transform) of DP-FedAvg for a fixed cohort of ``cohort_size`` clients.

  Use with ``FedAvg(weighting="uniform")`` so the server's mean is sum / cohort_size.
  """
  if cohort_size < 1:
    raise ValueError(f"cohort_size must be >= 1, got {cohort_size}.")
  std = 0.0 if noise_multiplier == 0 else noise_multiplier * clip / cohort_size  # clip may be inf
  return clip_l2(clip), gaussian_noise(std)
