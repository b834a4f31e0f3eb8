"""The small model interface the federated core needs: init, and apply with train/eval and a padding mask."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_tl.types import ModelState, Params, PRNGKey

__all__ = ["Model", "scale_uint8"]


def scale_uint8(x: jax.Array) -> jax.Array:
  """Default preprocessing: uint8 [0, 255] -> float32 [0, 1]."""
  return x.astype(jnp.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class Model:
  """A flax module plus the preprocessing that turns stored examples into its inputs.

  The module's ``__call__(x, train: bool, mask=None)`` returns logits; ``mask`` (bool [batch]) marks real
  examples so that normalisation layers can ignore padding (reshape it to broadcast against the activations,
  e.g. ``BatchNorm()(x, mask=mask[:, None, None, None])``). Non-``params`` collections
  (e.g. ``batch_stats``) are the model *state*, updated in training mode.

  Attributes:
    module: the flax linen module.
    sample_shape: shape of one stored example, e.g. (8, 8, 1) or (32, 32, 3).
    preprocess: maps a batch of stored examples (uint8) to model inputs, inside the jitted step.
    sample_dtype: dtype of stored examples.
  """

  module: nn.Module
  sample_shape: tuple[int, ...]
  preprocess: Callable[[jax.Array], jax.Array] = scale_uint8
  sample_dtype: Any = jnp.uint8

  def init(self, key: PRNGKey) -> tuple[Params, ModelState]:
    x = jnp.zeros((1, *self.sample_shape), self.sample_dtype)
    variables = self.module.init(key, self.preprocess(x), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables

  def apply(self, params: Params, state: ModelState, x: jax.Array, *, train: bool,
            mask: jax.Array | None = None, rng: PRNGKey | None = None) -> tuple[jax.Array, ModelState]:
    """Logits for a batch of stored examples, and the updated state (unchanged in eval mode)."""
    variables = {"params": params, **state}
    rngs = {"dropout": rng} if rng is not None else None
    x = self.preprocess(x)
    if train and state:
      logits, new_state = self.module.apply(variables, x, train=True, mask=mask, rngs=rngs,
                                            mutable=list(state.keys()))
      return logits, dict(new_state)
    return self.module.apply(variables, x, train=train, mask=mask, rngs=rngs), state
