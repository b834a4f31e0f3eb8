"""Batched evaluation of a model on a held-out set (a few fixed batch shapes, padding masked)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.core.client import masked_cross_entropy
from fedjax_tl.data.client_data import check_labels
from fedjax_tl.models.base import Model
from fedjax_tl.types import ModelState, Params

__all__ = ["evaluate", "eval_batch_size"]

_MIN_BUCKET = 8


def eval_batch_size(n: int, batch_size: int = 256) -> int:
  """The batch shape ``evaluate`` uses for ``n`` examples: ``batch_size``, or for a smaller set the next power
  of two (at least 8), so evaluation sets of any size below ``batch_size`` compile at most
  ~log2(batch_size) programs instead of one per distinct size."""
  if n >= batch_size:
    return batch_size
  return min(batch_size, max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_batch(model: Model, params, state, x, y, mask):
  logits, _ = model.apply(params, state, x, train=False)
  _, loss_sum, correct, count = masked_cross_entropy(logits, y, mask)
  return jnp.stack([loss_sum, correct, count])


def evaluate(model: Model, params: Params, model_state: ModelState, x, y, batch_size: int = 256) -> dict:
  """{"loss", "accuracy", "num_examples"} of ``model`` on (x, y), as Python floats.

  ``y`` must hold integer class indices in [0, number of model outputs) (a ValueError names any others).

  Batches have ``eval_batch_size(len(y), batch_size)`` rows (a set smaller than ``batch_size`` is padded up to
  a power of two; padded rows are masked out of every sum), so a model compiles once per bucket, not once per
  evaluation-set size (per-client evaluation of 20 clients of 20 sizes: at most 6 programs).
  """
  n = len(y)
  if n == 0:
    raise ValueError("Cannot evaluate on an empty dataset.")
  check_labels(y, model.num_outputs(), f"evaluation labels (the model has {model.num_outputs()} outputs)")
  x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  b = eval_batch_size(n, batch_size)
  total = jnp.zeros(3)
  for start in range(0, n, b):
    idx = np.minimum(np.arange(start, start + b), n - 1)
    mask = jnp.asarray(np.arange(start, start + b) < n)
    total = total + _eval_batch(model, params, model_state, x[idx], y[idx], mask)
  loss_sum, correct, count = (float(v) for v in total)
  return {"loss": loss_sum / count, "accuracy": correct / count, "num_examples": int(count)}
