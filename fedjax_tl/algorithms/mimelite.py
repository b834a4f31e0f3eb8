"""MimeLite (Karimireddy et al. 2021, "Breaking the centralized barrier for cross-device federated learning",
NeurIPS): clients apply the server's momentum, frozen, in every local step.

The server keeps a momentum ``m``; a client runs SGD on ``(1 - beta) g + beta m`` (``g`` its minibatch gradient)
and sends, besides its delta, its gradient at the server's model (the minibatch gradient of its first local step, at
the params it received: a one-batch estimate of the paper's full-batch gradient). The server averages the deltas as
FedAvg does and updates ``m <- (1 - beta) mean(g_i(x)) + beta m`` (examples-weighted). With ``beta = 0`` it is FedAvg
bit for bit. Use it with ``optax.sgd(lr)`` as the client optimizer (the paper's base optimizer is momentum SGD,
whose state is the server's ``m``). Uplink: one extra params-sized gradient per client (float32), plus its weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["MimeLite"]


@dataclasses.dataclass(frozen=True)
class MimeLite(ftl.Hooks):
  """``FedAvg(LocalTraining(model, optax.sgd(lr), ...), hooks=MimeLite(beta=0.9))``."""

  beta: float = 0.9

  def __post_init__(self):
    if not 0 <= self.beta < 1:
      raise ValueError(f"MimeLite's beta must be in [0, 1), got {self.beta}.")

  def server_init(self, params):
    return jax.tree.map(jnp.zeros_like, params)  # the momentum m

  def broadcast(self, state, params):
    return state

  def start(self, ctx):
    return jax.tree.map(jnp.zeros_like, ctx.global_params)  # the gradient at the received params, once seen

  def grads(self, grads, params, state, ctx, t):
    first = jax.tree.map(lambda g, s: jnp.where(t == 0, g, s), grads, state)
    if self.beta == 0:
      return grads, first
    b = self.beta
    return jax.tree.map(lambda g, m: (1 - b) * g + b * m.astype(g.dtype), grads, ctx.server), first

  def finish(self, delta, params, state, ctx, steps):
    n = ctx.num_examples.astype(jnp.float32)
    return delta, {"grad": jax.tree.map(lambda g: n * g, state), "weight": n}, ctx.client_state

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    w = jnp.maximum(message_sum["weight"], 1e-12)
    b = self.beta
    return mean_delta, jax.tree.map(lambda m, g: (1 - b) * (g / w).astype(m.dtype) + b * m, state, message_sum["grad"])
