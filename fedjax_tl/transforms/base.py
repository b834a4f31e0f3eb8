"""The update-transform abstraction, modelled on optax's GradientTransformation.

An :class:`UpdateTransform` is a pair of pure functions:

    state = t.init(updates_template)
    updates, state = t.apply(updates, state, key)

with the PRNG key passed explicitly, so vmapped clients each get their own. Client-side transforms run per
client inside the round (vmapped with the client's own key) before aggregation; server-side transforms act on
the aggregate. Transforms compose with :func:`chain`, which gives each member its own key.

A client transform's state is *per client* and persists across rounds for every client of the population
(``FedAvg`` stores it in ``ServerState.transform_states`` and checkpoints it with the rest), e.g. the residual
of error feedback. A transform that changes what is sent declares ``encoded_bits(template)``: the exact size
in bits of its encoding of an update shaped like ``template`` (dense float32 when absent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedjax_tl.tree import tree_bits
from fedjax_tl.types import PRNGKey, Updates

__all__ = ["UpdateTransform", "EmptyState", "chain", "identity", "stateless", "is_stateless", "encoded_bits",
           "dense_bits"]


class EmptyState(NamedTuple):
  """The state of a stateless transform."""


class UpdateTransform(NamedTuple):
  init: Callable[[Updates], Any]
  apply: Callable[[Updates, Any, PRNGKey], tuple[Updates, Any]]
  encoded_bits: Callable[[Updates], int] | None = None  # exact size of what is sent; None = dense as given


dense_bits = tree_bits  # the old name: bits of ``template`` sent as it is (every array at its own dtype)


def encoded_bits(t: UpdateTransform | None, template: Updates) -> int:
  """Bits that ``t`` sends for an update shaped like ``template`` (dense when ``t`` does not compress)."""
  if t is None or t.encoded_bits is None:
    return tree_bits(template)
  return int(t.encoded_bits(template))


def stateless(fn: Callable[[Updates, PRNGKey], Updates],
              bits: Callable[[Updates], int] | None = None) -> UpdateTransform:
  """The transform of ``fn(updates, key) -> updates``, which keeps no state (:class:`EmptyState`); ``bits`` is its
  ``encoded_bits`` (None: it sends the update as it is)."""

  def init(updates):
    del updates
    return EmptyState()

  def apply(updates, state, key):
    return fn(updates, key), state

  return UpdateTransform(init, apply, bits)


def identity() -> UpdateTransform:
  """Sends the update unchanged."""
  return stateless(lambda updates, key: updates)


def chain(*transforms: UpdateTransform) -> UpdateTransform:
  """Applies ``transforms`` in order; member i gets ``fold_in(key, i)``; the state is a tuple of states.

  The encoded size is that of the one compressing member (members such as clipping do not change it); a
  chain of two compressors has no defined size and is refused.
  """
  compressors = [t for t in transforms if t.encoded_bits is not None]
  if len(compressors) > 1:
    raise ValueError(f"chain() got {len(compressors)} compressors; the size of a doubly compressed update is not "
                     "defined. Use one compressor per chain (clipping and noise may go around it).")

  def init(updates):
    return tuple(t.init(updates) for t in transforms)

  def apply(updates, state, key):
    new_states = []
    for i, (t, s) in enumerate(zip(transforms, state, strict=True)):
      updates, s = t.apply(updates, s, jax.random.fold_in(key, i))
      new_states.append(s)
    return updates, tuple(new_states)

  return UpdateTransform(init, apply, compressors[0].encoded_bits if compressors else None)


def is_stateless(t: UpdateTransform, template: Updates) -> bool:
  return not jax.tree.leaves(t.init(template))
