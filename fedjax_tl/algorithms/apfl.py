"""APFL, adaptive personalized federated learning (Deng, Kamani and Mahdavi 2020).

Every client keeps a personal model ``v`` and trains, in the same local steps and on the same batches, the global
model ``w`` as FedAvg does and ``v`` on the loss of the mixture ``alpha v + (1 - alpha) w``:
``v <- v - lr * grad_v f(alpha v + (1 - alpha) w)`` (``w`` held fixed in that gradient). Its model for evaluation is
the mixture (:func:`personal_models`). ``alpha`` is fixed, or adapted per client (``adapt_alpha=True``:
``alpha <- clip(alpha - lr * <v - w, grad f(mix)>, 0, 1)`` each step, as in the paper). ``alpha = 0`` is FedAvg (the
personal model is never used). The personal steps run the model in inference mode (as the loss hook's ``apply``):
exact for models without BatchNorm. Traffic is FedAvg's; each client keeps ``v`` (and its ``alpha``) in its row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["APFL", "personal_models"]


@dataclasses.dataclass(frozen=True)
class APFL(ftl.Hooks):
  """``FedAvg(LocalTraining(model, optax.sgd(lr), ...), hooks=APFL(alpha=0.25, lr=lr))``;
  ``init(..., num_clients=N)``."""

  alpha: float = 0.25
  lr: float = 0.1
  adapt_alpha: bool = False

  def __post_init__(self):
    if not 0 <= self.alpha <= 1 or not self.lr > 0:
      raise ValueError(f"APFL needs alpha in [0, 1] and lr > 0, got {self.alpha}, {self.lr}.")

  def client_init(self, params):
    return {"v": params, "alpha": jnp.float32(self.alpha)}

  def start(self, ctx):
    return ctx.client_state

  def loss(self, loss, batch, params, state, ctx, t):
    if self.alpha == 0 and not self.adapt_alpha:
      return loss, state
    w = jax.lax.stop_gradient(params)
    v, a = state["v"], state["alpha"]

    def mixed_loss(v, a):
      mix = jax.tree.map(lambda vv, ww: a * vv + (1 - a) * ww, v, w)
      return batch.objective(batch.apply(mix))

    gv, ga = jax.grad(mixed_loss, argnums=(0, 1))(v, a)
    v = jax.tree.map(lambda vv, g: vv - self.lr * g, v, gv)
    if self.adapt_alpha:
      a = jnp.clip(a - self.lr * ga, 0.0, 1.0)
    return loss, jax.lax.stop_gradient({"v": v, "alpha": a})

  def finish(self, delta, params, state, ctx, steps):
    return delta, None, state, {"apfl_alpha": state["alpha"]}


def personal_models(state) -> object:
  """Every client's APFL model ``alpha_i v_i + (1 - alpha_i) w`` (the trainable params), stacked ``[N, ...]``."""
  rows = state.algorithm_clients
  a = rows["alpha"]
  return jax.tree.map(lambda v, w: a.reshape(-1, *(1,) * w.ndim) * v + (1 - a.reshape(-1, *(1,) * w.ndim)) * w[None],
                      rows["v"], state.params)
