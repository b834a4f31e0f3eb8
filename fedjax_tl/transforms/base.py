"""The update-transform abstraction, modelled on optax's GradientTransformation.

An :class:`UpdateTransform` is a pair of pure functions:

    state = t.init(updates_template)
    updates, state = t.apply(updates, state, key)

with the PRNG key passed explicitly, so vmapped clients each get their own. Client-side transforms run per
client inside the round (vmapped with the client's own key) before aggregation; server-side transforms act on
the aggregate. Transforms compose with :func:`chain`, which gives each member its own key.

Per-client state that persists across rounds (error-feedback residuals) is not wired into the round yet:
``FedAvg`` accepts stateless client transforms only and says so for stateful ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedjax_tl.types import PRNGKey, Updates

__all__ = ["UpdateTransform", "EmptyState", "chain", "identity", "is_stateless"]


class EmptyState(NamedTuple):
  """The state of a stateless transform."""


class UpdateTransform(NamedTuple):
  init: Callable[[Updates], Any]
  apply: Callable[[Updates, Any, PRNGKey], tuple[Updates, Any]]


def identity() -> UpdateTransform:
  def init(updates):
    del updates
    return EmptyState()

  def apply(updates, state, key):
    del key
    return updates, state

  return UpdateTransform(init, apply)


def chain(*transforms: UpdateTransform) -> UpdateTransform:
  """Applies ``transforms`` in order; member i gets ``fold_in(key, i)``; the state is a tuple of states."""

  def init(updates):
    return tuple(t.init(updates) for t in transforms)

  def apply(updates, state, key):
    new_states = []
    for i, (t, s) in enumerate(zip(transforms, state, strict=True)):
      updates, s = t.apply(updates, s, jax.random.fold_in(key, i))
      new_states.append(s)
    return updates, tuple(new_states)

  return UpdateTransform(init, apply)


def is_stateless(t: UpdateTransform, template: Updates) -> bool:
  return not jax.tree.leaves(t.init(template))
