"""Shared type aliases and the sign convention, written once.

Sign convention: a client's *delta* is ``client_params - server_params`` (the direction it moved). The server
treats ``-mean_delta`` as a *pseudo-gradient* for its optax optimizer, so plain FedAvg is ``optax.sgd(1.0)``:
``server_params - 1.0 * (-mean_delta) = server_params + mean_delta``.
"""

from __future__ import annotations

from typing import Any

import jax

PRNGKey = jax.Array
Params = Any  # a pytree of arrays (flax ``params`` collection, possibly only the trainable part)
ModelState = Any  # non-trainable collections, e.g. {"batch_stats": ...}; {} when the model has none
Updates = Any  # a pytree shaped like Params
OptState = Any  # an optax optimizer's state (optax.OptState, whose recursive alias pdoc cannot resolve)
PyTree = Any


def pseudo_gradient(mean_delta: Updates) -> Updates:
  """The server optimizer's gradient: the negated average client delta."""
  return jax.tree.map(lambda d: -d, mean_delta)
