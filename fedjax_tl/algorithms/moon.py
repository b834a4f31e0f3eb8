"""MOON, model-contrastive federated learning (Li, He and Song 2021, CVPR).

Each local step adds ``mu * l_con`` to the objective's loss: with ``z`` the representation of the model being
trained, ``z_glob`` that of the global model the client received and ``z_prev`` that of the client's own model after
its previous round (all on the same batch),
``l_con = -log(exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)))``, ``sim`` the cosine
similarity, averaged over the batch's real examples. The model must return its representation:
``{"logits": ..., "features": ...}`` from its module (:func:`fedjax_tl.models.base.logits_of`). Each client keeps its
previous model (the trainable params) in its row: memory population x trainable params (a host store, ``FedAvg.init(...,
client_store="host")``, for large populations); a client starts with the initial global model as its previous one.
``mu = 0`` is FedAvg.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["MOON", "features_of"]


def features_of(outputs) -> jax.Array:
  """The representation ``[B, d]`` a module returned under "features"."""
  if not isinstance(outputs, dict) or "features" not in outputs:
    raise ValueError("MOON needs the model's representation: make the module return {'logits': ..., 'features': "
                     f"...}}, got {type(outputs).__name__}{sorted(outputs) if isinstance(outputs, dict) else ''}.")
  f = outputs["features"]
  return f.reshape(f.shape[0], -1).astype(jnp.float32)


def _cos(a, b):
  return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)


@dataclasses.dataclass(frozen=True)
class MOON(ftl.Hooks):
  """``FedAvg(local, hooks=MOON(mu=1.0, temperature=0.5))``; ``FedAvg.init(..., num_clients=N)``."""

  mu: float = 1.0
  temperature: float = 0.5

  def __post_init__(self):
    if not self.mu >= 0 or not self.temperature > 0:
      raise ValueError(f"MOON needs mu >= 0 and temperature > 0, got {self.mu}, {self.temperature}.")

  def client_init(self, params):
    return params  # the client's previous local model

  def loss(self, loss, batch, params, state, ctx, t):
    if self.mu == 0:
      return loss, state
    z = features_of(batch.outputs)
    z_glob = jax.lax.stop_gradient(features_of(batch.apply(ctx.global_params)))
    z_prev = jax.lax.stop_gradient(features_of(batch.apply(ctx.client_state)))
    pos, neg = _cos(z, z_glob) / self.temperature, _cos(z, z_prev) / self.temperature
    per = jnp.logaddexp(pos, neg) - pos
    m = batch.mask.astype(jnp.float32)
    return loss + self.mu * (per * m).sum() / jnp.maximum(m.sum(), 1.0), state

  def finish(self, delta, params, state, ctx, steps):
    prev = jax.tree.map(lambda p, o: jnp.where(steps > 0, p, o), params, ctx.client_state)
    return delta, None, prev
