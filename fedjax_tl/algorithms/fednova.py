"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS).

Clients run different numbers of local steps ``tau_i`` (here: their own epochs over unequal data). FedAvg then
over-weights the clients that ran longest; FedNova averages normalised updates instead: each client sends
``delta_i / ||a_i||_1`` and ``||a_i||_1``, and the server applies ``tau_eff * sum_i p_i delta_i / ||a_i||_1`` with
``tau_eff = sum_i p_i ||a_i||_1``, ``p_i`` the weights of the delta's average: ``weighting="num_examples"`` for
the default ``Mean()`` aggregator, ``"uniform"`` with ``UniformMean()``. For local SGD ``||a_i||_1 = tau_i``; with
heavy-ball momentum ``rho`` it is ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)`` (the paper's eq. for
momentum SGD). The extra message is two float32 per client (``p_i``'s numerator times ``||a_i||_1``, and it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["FedNova"]


@dataclasses.dataclass(frozen=True)
class FedNova(ftl.Hooks):
  """``FedAvg(local, hooks=FedNova())`` for local SGD; ``FedNova(momentum=rho)`` for ``optax.sgd(lr, rho)``."""

  momentum: float = 0.0
  weighting: str = "num_examples"

  def __post_init__(self):
    if not 0 <= self.momentum < 1:
      raise ValueError(f"FedNova's momentum must be in [0, 1), got {self.momentum}.")
    if self.weighting not in ("num_examples", "uniform"):
      raise ValueError(f"FedNova's weighting must be 'num_examples' or 'uniform', got {self.weighting!r}.")

  def norm(self, steps: jax.Array) -> jax.Array:
    """``||a_i||_1`` after ``steps`` local steps."""
    tau, rho = steps.astype(jnp.float32), self.momentum
    if rho == 0:
      return tau
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)

  def finish(self, delta, params, state, ctx, steps):
    a = self.norm(steps)
    normalised = jax.tree.map(lambda d: d / jnp.maximum(a, 1e-12).astype(d.dtype), delta)
    w = ctx.num_examples.astype(jnp.float32) if self.weighting == "num_examples" else jnp.float32(1)
    return normalised, {"weighted_norm": w * a, "weight": w}, ctx.client_state

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    tau_eff = message_sum["weighted_norm"] / jnp.maximum(message_sum["weight"], 1e-12)
    return jax.tree.map(lambda d: d * tau_eff.astype(d.dtype), mean_delta), state
