"""Batched evaluation of a model on a held-out set (fixed batch shape, last batch masked)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.core.client import masked_cross_entropy
from fedjax_tl.models.base import Model
from fedjax_tl.types import ModelState, Params

__all__ = ["evaluate"]


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_batch(model: Model, params, state, x, y, mask):
  logits, _ = model.apply(params, state, x, train=False)
  _, loss_sum, correct, count = masked_cross_entropy(logits, y, mask)
  return jnp.stack([loss_sum, correct, count])


def evaluate(model: Model, params: Params, model_state: ModelState, x, y, batch_size: int = 256) -> dict:
  """{"loss", "accuracy", "num_examples"} of ``model`` on (x, y), as Python floats.

  Every batch has the same shape (the last is padded and masked), so this compiles once per model.
  """
  n = len(y)
  if n == 0:
    raise ValueError("Cannot evaluate on an empty dataset.")
  x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  b = min(batch_size, n)
  total = jnp.zeros(3)
  for start in range(0, n, b):
    idx = np.minimum(np.arange(start, start + b), n - 1)
    mask = jnp.asarray(np.arange(start, start + b) < n)
    total = total + _eval_batch(model, params, model_state, x[idx], y[idx], mask)
  loss_sum, correct, count = (float(v) for v in total)
  return {"loss": loss_sum / count, "accuracy": correct / count, "num_examples": int(count)}
