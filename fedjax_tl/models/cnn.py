"""Small CNNs for the offline demo, tests and the CPU benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Im2ColConv(nn.Module):
  """A stride-1 'SAME' convolution computed as patches @ kernel, with the same params as ``nn.Conv``.

  Under ``vmap`` over clients (each with its own kernel) XLA turns ``nn.Conv`` into a grouped convolution,
  which XLA:CPU runs slowly; this version becomes a batched matrix multiply instead. Measured on a 2-core
  CPU, the workload-P CNN vmapped over 10 clients: 333 -> 876 examples/s (see the README's benchmark).
  Patches are built from shifted slices (``conv_general_dilated_patches`` is itself a convolution).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    h, w = x.shape[1], x.shape[2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ kernel.reshape(-1, self.features) + bias


class CNN(nn.Module):
  """conv3x3(f) - relu - maxpool2 per entry of ``features``, then dense(hidden) - relu - dense(num_classes).

  ``features=(32, 64), hidden=128`` is the benchmark CNN of the performance issue (workload P).
  The classifier is named ``head`` so transfer learning can swap it (``dont_load`` regex ``^head/``).
  ``conv`` chooses the lowering (same params, same function): "xla" (``nn.Conv``), "im2col" (matrix
  multiplies; measured faster on CPU for every schedule, 2-5x under vmap) or "auto" (im2col on CPU, XLA's
  convolution on accelerators, where cuDNN/TPU convolutions are the fast path).
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  pool: bool = True
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask  # no normalisation or dropout
    if self.conv not in ("auto", "xla", "im2col"):
      raise ValueError(f"conv must be 'auto', 'xla' or 'im2col', got {self.conv!r}")
    conv = self.conv if self.conv != "auto" else ("im2col" if jax.default_backend() == "cpu" else "xla")
    for i, f in enumerate(self.features):
      if conv == "xla":
        x = nn.Conv(f, (3, 3), name=f"conv{i}")(x)
      else:
        x = Im2ColConv(f, name=f"conv{i}")(x)
      x = nn.relu(x)
      if self.pool:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_classes, name="head")(x)
