"""q-FFL, q-fair federated learning (Li, Sanjabi, Beirami and Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR), the q-FedAvg update.

Clients with a higher loss weigh more: client ``k`` with loss ``F_k`` at the received model ``w`` (the objective's
loss on its first local batch) trains as FedAvg and reports ``Delta_k = L (w - w_k)`` (``L = 1 / lr``, its local
learning rate's inverse, the paper's Lipschitz estimate) scaled by ``F_k^q``, and
``h_k = q F_k^(q-1) ||Delta_k||^2 + L F_k^q``; the server steps ``w <- w - sum_k F_k^q Delta_k / sum_k h_k``.
``q = 0`` averages the clients' updates uniformly (each with weight 1 / number of clients). Use it with the
default examples-weighted ``Mean()`` aggregator and ``optax.sgd(1.0)`` on the server (the step above is the update):
the scaled delta travels as FedAvg's delta (divided by the client's weight, which the mean multiplies back), ``h_k``
and the weights in the message's sum part (32 bits counted).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["QFFL"]


@dataclasses.dataclass(frozen=True)
class QFFL(ftl.Hooks):
  """``FedAvg(LocalTraining(model, optax.sgd(lr), ...), hooks=QFFL(q=1.0, lr=lr))``."""

  q: float = 1.0
  lr: float = 0.1

  def __post_init__(self):
    if not self.q >= 0 or not self.lr > 0:
      raise ValueError(f"q-FFL needs q >= 0 and the client learning rate lr > 0, got {self.q}, {self.lr}.")

  def start(self, ctx):
    return jnp.zeros((), jnp.float32)  # F_k: the loss at the received model, once seen

  def loss(self, loss, batch, params, state, ctx, t):
    return loss, jnp.where(t == 0, jax.lax.stop_gradient(loss), state)

  def finish(self, delta, params, state, ctx, steps):
    big_l, q = 1.0 / self.lr, self.q
    f = state + 1e-10
    dw = jax.tree.map(lambda d: -big_l * d, delta)
    norm2 = sum(jnp.sum(d.astype(jnp.float32) ** 2) for d in jax.tree.leaves(dw))
    n = ctx.num_examples.astype(jnp.float32)
    real = (n > 0).astype(jnp.float32)
    h = (q * f ** (q - 1) * norm2 if q else 0.0) + big_l * f**q
    scaled = jax.tree.map(lambda d: (f**q * d / jnp.maximum(n, 1.0)).astype(d.dtype), dw)
    return scaled, {"h": h * real, "n": n}, ctx.client_state

  def message_bits(self, message):
    return 32  # h_k (the weight n_k is FedAvg's own)

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    total = message_sum["n"] / jnp.maximum(message_sum["h"], 1e-12)  # mean x sum n = sum F^q Delta; / sum h
    return jax.tree.map(lambda d: -d * total.astype(d.dtype), mean_delta), state
