"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Every client minimises its loss plus ``mu/2 * ||w - w_global||^2``, where ``w_global`` is the model it received
this round. Here that is a client-side optax transform, chained before the client optimizer, adding the proximal
gradient ``mu * (w - w_global)`` to the loss gradient; ``w_global`` is the params the optimizer is initialised
with, which is the broadcast model since the client optimizer starts fresh every round
(:class:`~fedjax_tl.LocalTraining`). The anchor is a copy of the trainable params per client (memory: one more
model per client trained at once). The server side is FedAvg's (any server optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import optax

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.types import Params

__all__ = ["ProxState", "proximal_term", "fedprox"]


class ProxState(NamedTuple):
  anchor: Params  # w_global: the params at the start of local training


@functools.cache
def proximal_term(mu: float) -> optax.GradientTransformation:
  """Adds ``mu * (params - anchor)`` to the gradient; the anchor is the params ``init`` was given."""

  def init(params):
    return ProxState(jax.tree.map(lambda p: p, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("proximal_term needs the params: call update(grads, state, params).")
    out = jax.tree.map(lambda g, w, a: (g + mu * (w - a)).astype(g.dtype), updates, params, state.anchor)
    return out, state

  return optax.GradientTransformation(init, update)


@functools.cache
def fedprox(local: LocalTraining, mu: float) -> LocalTraining:
  """``local`` with its optimizer chained after FedProx's proximal term of strength ``mu`` (>= 0).

  ``mu=0`` adds exactly zero and gives FedAvg's local training, bit for bit. Cached: equal arguments give the
  same LocalTraining, so equal FedAvgs share their compiled programs.
  """
  if mu < 0:
    raise ValueError(f"FedProx's mu must be >= 0, got {mu}.")
  return dataclasses.replace(local, optimizer=optax.chain(proximal_term(mu), local.optimizer))
