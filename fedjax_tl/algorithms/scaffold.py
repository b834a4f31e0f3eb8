"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML).

Each client keeps a control variate ``c_i`` and the server keeps ``c``; local steps follow the corrected gradient
``g + c - c_i``. After ``K`` local steps from ``x`` to ``y_i`` with learning rate ``lr``, option II sets
``c_i+ = c_i - c + (x - y_i) / (K lr)`` and the client sends ``delta_c = c_i+ - c_i`` next to its model delta;
the server sets ``c += 1 / N * sum_{i in S} delta_c`` (S the cohort, N the population), which keeps ``c`` the mean
of all the clients' ``c_i``, and applies the mean delta with the server optimizer (``optax.sgd(eta_g)`` is the
paper's global step size).

Averaging: the model delta is averaged by the aggregator (``Mean()`` weights by examples, the common FedAvg-style
implementation; ``UniformMean()`` gives the paper's unweighted mean); ``delta_c`` is always summed unweighted, as
the invariant ``c = mean_i c_i`` needs (weighting it would bias every correction ``c - c_i``). Traffic:
the broadcast ``c`` and the uplink ``delta_c`` are counted (each the size of the trainable params, float32), so
SCAFFOLD costs twice FedAvg's bytes each way. Option II assumes plain SGD on the client (``(x - y_i)/(K lr)`` is
then the mean corrected gradient); with another client optimizer it is a heuristic. Option I sets
``c_i+ = g_i(x)``, a stochastic gradient of the client's loss at the server model: here the gradient of its first
local minibatch, which local training computes at ``x`` anyway (no extra pass; one more params-sized buffer per
client while it trains).

Written on the public API only (``fedjax_tl.Hooks``), as an example of an algorithm with per-client state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["Scaffold"]


@dataclasses.dataclass(frozen=True)
class Scaffold(ftl.Hooks):
  """SCAFFOLD's hooks: ``FedAvg(local, hooks=Scaffold(lr))`` (option II, ``lr`` the client SGD rate) or
  ``Scaffold(option="I")``; ``init(..., num_clients=N)`` (every client's control variate is kept)."""

  lr: float = 0.0
  option: str = "II"

  def __post_init__(self):
    if self.option not in ("I", "II"):
      raise ValueError(f"SCAFFOLD's option must be 'I' or 'II', got {self.option!r}.")
    if self.option == "II" and not self.lr > 0:
      raise ValueError(f"SCAFFOLD option II needs the client learning rate lr > 0, got {self.lr}.")

  def server_init(self, params):
    return jax.tree.map(jnp.zeros_like, params)  # c

  def client_init(self, params):
    return jax.tree.map(jnp.zeros_like, params)  # c_i

  def broadcast(self, c, params):
    return c

  def start(self, ctx):
    return jax.tree.map(jnp.zeros_like, ctx.global_params) if self.option == "I" else None  # g_i(x)

  def grads(self, grads, params, state, ctx, t):
    if self.option == "I":  # local step 0 is at the server model x
      state = jax.tree.map(lambda g, s: jnp.where(t == 0, g, s), grads, state)
    return jax.tree.map(lambda g, c, ci: g + c - ci, grads, ctx.server, ctx.client_state), state

  def finish(self, delta, params, state, ctx, steps):
    if self.option == "I":
      new = jax.tree.map(lambda ci, g: jnp.where(steps > 0, g, ci), ctx.client_state, state)
    else:
      k = jnp.maximum(steps, 1).astype(jnp.float32)
      new = jax.tree.map(lambda ci, c, d: jnp.where(steps > 0, ci - c - d / (k * self.lr), ci),
                         ctx.client_state, ctx.server, delta)
    return delta, jax.tree.map(jnp.subtract, new, ctx.client_state), new

  def server_update(self, c, mean_delta, dc_sum, cohort_size, num_clients, client_metrics):
    return mean_delta, jax.tree.map(lambda a, b: a + b / num_clients.astype(b.dtype), c, dc_sum)
