"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization", ICLR).

Client ``i`` minimises ``L_i(w) - <g_i, w> + alpha/2 ||w - w^{t-1}||^2``, where ``g_i`` (its persistent state,
zero at first) is updated after local training to ``g_i - alpha (w_i - w^{t-1})``. The server keeps
``h <- h - alpha / N * sum_{i in S} (w_i - w^{t-1})`` and sets ``w^t = mean_S(w_i) - h / alpha`` (Algorithm 1).
Here the sum over the cohort is ``|S|`` times the aggregator's mean: exactly the paper's with
``aggregator=UniformMean()``; with ``Mean()`` (the default) it is the example-weighted analogue, consistent with
the example-weighted model average. Use it with the plain server optimizer (``optax.sgd(1.0)``, the default).
``alpha = 0`` is FedAvg exactly. Nothing extra is sent: ``g_i`` stays on the client and ``h`` on the server.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["FedDyn"]


@dataclasses.dataclass(frozen=True)
class FedDyn(ftl.Hooks):
  """``FedAvg(local, hooks=FedDyn(alpha))``; ``init(..., num_clients=N)`` (each client keeps its ``g_i``)."""

  alpha: float

  def __post_init__(self):
    if not self.alpha >= 0:
      raise ValueError(f"FedDyn's alpha must be >= 0, got {self.alpha}.")

  def server_init(self, params):
    return jax.tree.map(jnp.zeros_like, params)  # h

  def client_init(self, params):
    return jax.tree.map(jnp.zeros_like, params)  # g_i

  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(lambda g, gi, w, w0: g - gi + self.alpha * (w - w0), grads, ctx.client_state, params,
                        ctx.global_params), state

  def finish(self, delta, params, state, ctx, steps):
    new = jax.tree.map(lambda gi, d: jnp.where(steps > 0, gi - self.alpha * d, gi), ctx.client_state, delta)
    return delta, None, new

  def server_update(self, h, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    frac = cohort_size.astype(jnp.float32) / num_clients
    h = jax.tree.map(lambda h_, d: h_ - self.alpha * frac * d, h, mean_delta)
    if self.alpha == 0:
      return mean_delta, h
    return jax.tree.map(lambda d, h_: d - h_ / self.alpha, mean_delta, h), h
