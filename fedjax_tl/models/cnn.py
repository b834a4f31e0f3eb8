"""Small CNNs for the offline demo, tests and the CPU benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _im2col(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """[N, H, W, C] -> [N, H, W, kh*kw*C]: the 'SAME'-padded stride-1 patches, from shifted slices
  (``conv_general_dilated_patches`` is itself a convolution)."""
  h, w = x.shape[1], x.shape[2]
  top, left = (kh - 1) // 2, (kw - 1) // 2
  xp = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)


@jax.custom_vjp
def _conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw, _, f = kernel.shape
  return _im2col(x, kh, kw) @ kernel.reshape(-1, f)


def _conv_im2col_fwd(x, kernel):
  kh, kw, _, f = kernel.shape
  patches, col_vjp = jax.vjp(lambda v: _im2col(v, kh, kw), x)
  return patches @ kernel.reshape(-1, f), (patches, kernel, col_vjp)


def _conv_im2col_bwd(res, g):
  # The gradients autodiff gives, with the kernel's written as (g^T patches)^T: a plain matrix product that
  # XLA:CPU's fast GEMM path takes, where autodiff's transposed-operand form is a slow generic dot.
  patches, kernel, col_vjp = res
  f = kernel.shape[-1]
  dkernel = (g.reshape(-1, f).T @ patches.reshape(-1, patches.shape[-1])).T.reshape(kernel.shape)
  (dx,) = col_vjp(g @ kernel.reshape(-1, f).T)
  return dx, dkernel


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


class Im2ColConv(nn.Module):
  """A stride-1 'SAME' convolution computed as patches @ kernel, with the same params as ``nn.Conv``.

  Under ``vmap`` over clients (each with its own kernel) XLA turns ``nn.Conv`` into a grouped convolution,
  which XLA:CPU runs slowly, and inside a ``lax.scan`` XLA:CPU's convolution is slow even for one client; this
  version is matrix multiplies instead. Measured on a 2-core CPU, the workload-P CNN vmapped over 10 clients:
  333 -> 876 examples/s. Its backward pass is hand-written (same maths, see ``_conv_im2col_bwd``): one client,
  100 steps of batch 32 in a ``lax.scan``, ~2930 -> ~3340 examples/s. Being a ``custom_vjp``, it supports
  reverse-mode differentiation (``jax.grad``/``vjp``) but not ``jax.jvp``.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return _conv_im2col(x, kernel) + bias


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, 'VALID' (an odd trailing row/column is dropped): ``nn.max_pool(x, (2, 2),
  (2, 2))`` with the same values and the same gradient (at a tie the first maximum in the window gets it).

  A reshape and a max, with a hand-written gradient from a saved one-hot mask of the winners, instead of
  ``reduce_window``, whose gradient is a ``select_and_scatter`` that XLA:CPU runs slowly. Measured on a 2-core
  CPU, the workload-P CNN (im2col), one client, 200 steps of batch 32 in a ``lax.scan``: 1718 -> 2749
  examples/s with the reshape and autodiff, ~2700 -> ~3050 with the saved mask.
  """
  return _pool_fwd(x)[0]


def _pool_fwd(x):
  n, h, w, c = x.shape
  xr = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  m = xr.max(axis=(2, 4))
  taken = jnp.zeros(m.shape, bool)
  rows = []
  for a in range(2):
    row = []
    for b in range(2):
      win = (xr[:, :, a, :, b] == m) & ~taken
      taken = taken | win
      row.append(win)
    rows.append(jnp.stack(row, axis=3))
  return m, (jnp.stack(rows, axis=2), (h, w))


def _pool_bwd(res, g):
  mask, (h, w) = res
  n, h2, _, w2, _, c = mask.shape
  dx = jnp.where(mask, g[:, :, None, :, None], 0).reshape(n, 2 * h2, 2 * w2, c)
  return (jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


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
  representation: bool = False  # return {"logits", "features": the hidden layer} (for MOON)

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
        x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    logits = nn.Dense(self.num_classes, name="head")(x)
    return {"logits": logits, "features": x} if self.representation else logits
