"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML).

Every round the cohort trains the global model exactly as FedAvg does, and each of its clients also trains its
own personal model ``v_k`` on its data with a proximal pull to the global model it received this round:
``v_k <- v_k - lr * (grad F_k(v_k) + lam * (v_k - w^t))`` (Algorithm 1 of the paper; the personal steps use
``personal_local``, by default the same local training). ``lam = 0`` gives purely local models; large ``lam``
keeps the personal models at the global one. Evaluate the personal models with
``evaluate_per_client(model, state.personal_params(), ...)``.

Built on the public API from two :class:`~fedjax_tl.FedAvg` rounds: the global one, and a personal one in which
every trainable parameter is the client's own (``local_params``: trained locally, kept per client, never sent),
with a :class:`~fedjax_tl.Hooks` adding the proximal gradient towards the broadcast global model. The personal
pass sends nothing (its anchor is the global model the client already received), so Ditto's traffic is FedAvg's.
The state is a pytree of both servers' states and checkpoints like any other.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import optax

import fedjax_tl as ftl
from fedjax_tl.core.checks import check_optimizer

__all__ = ["Ditto", "DittoState", "DittoOnePass", "personal_params"]


class DittoState(NamedTuple):
  server: ftl.ServerState  # the global model's FedAvg state
  personal: ftl.ServerState  # every client's personal model (its client_params), anchor in algorithm_state

  @property
  def round(self):
    return self.server.round

  @property
  def model_state(self):
    """The global model's state (e.g. BatchNorm statistics)."""
    return self.server.model_state

  def full_params(self):
    """The global model."""
    return self.server.full_params()

  def personal_params(self):
    """Every client's personal model, stacked ``[num_clients, ...]``."""
    return self.personal.all_client_params()


@dataclasses.dataclass(frozen=True)
class _ProximalToGlobal(ftl.Hooks):
  """Adds ``lam * (v - w)`` to the personal model's gradient, ``w`` the global model broadcast this round."""

  lam: float

  def broadcast(self, anchor, params):
    return anchor

  def broadcast_bits(self, sent):
    return 0  # the global model: the client received it with the global round

  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(lambda g, v, w: g + self.lam * (v - w), grads, params, ctx.server), state


@dataclasses.dataclass(frozen=True)
class Ditto:
  """Ditto with global FedAvg (any server optimizer) and proximal personal models.

  Attributes:
    local: the global model's local training.
    lam: strength of the personal models' pull to the global model (>= 0).
    personal_local: the personal models' local training (default: ``local``).
    server_optimizer, schedule, trainable, model_state: as for :class:`~fedjax_tl.FedAvg` (the personal models
      keep their own BatchNorm statistics unless ``model_state="frozen"``).
    aggregator, client_transform, server_transform, downlink: the global model's, as for FedAvg (DP, secure
      aggregation, compression of what is sent; the personal pass sends nothing, so they do not apply to it; its
      anchor is the global model in full precision).
  """

  local: ftl.LocalTraining
  lam: float
  personal_local: ftl.LocalTraining | None = None
  server_optimizer: optax.GradientTransformation = optax.sgd(1.0)
  schedule: str | ftl.Schedule = "auto"
  trainable: str | None = None
  model_state: str = "average"
  aggregator: ftl.aggregators.Aggregator = ftl.aggregators.Mean()
  client_transform: ftl.UpdateTransform | None = None
  server_transform: ftl.UpdateTransform | None = None
  downlink: ftl.UpdateTransform | None = None

  def __post_init__(self):
    if not self.lam >= 0:
      raise ValueError(f"Ditto's lam must be >= 0, got {self.lam}.")
    check_optimizer(self.server_optimizer, "Ditto's server_optimizer", "optax.sgd(1.0) (plain FedAvg)")
    personal_ms = "frozen" if self.model_state == "frozen" else "local"
    object.__setattr__(self, "_global", ftl.FedAvg(self.local, self.server_optimizer, self.schedule,
                                                   trainable=self.trainable, model_state=self.model_state,
                                                   aggregator=self.aggregator, client_transform=self.client_transform,
                                                   server_transform=self.server_transform, downlink=self.downlink))
    object.__setattr__(self, "_personal", ftl.FedAvg(self.personal_local or self.local, schedule=self.schedule,
                                                     trainable=self.trainable, model_state=personal_ms,
                                                     local_params=".*", hooks=_ProximalToGlobal(self.lam)))
    object.__setattr__(self, "schedule", self._global.schedule)  # "auto" resolved, as FedAvg's

  def init(self, params, model_state=None, num_clients: int | None = None) -> DittoState:
    if not num_clients:
      raise ValueError("Ditto keeps a personal model per client: pass num_clients to init().")
    server = self._global.init(params, model_state, num_clients=num_clients)
    personal = self._personal.init(params, model_state, num_clients=num_clients)
    return DittoState(server, personal._replace(algorithm_state=server.params))

  def apply(self, state: DittoState, data, client_ids, key, **round_inputs) -> tuple[DittoState, dict]:
    """One round: the global FedAvg round and, from the same broadcast, the cohort's personal steps; the round's
    inputs (``reported``, ``step_budget``: :meth:`FedAvg.apply`) apply to both."""
    personal, pm = self._personal.apply(state.personal._replace(algorithm_state=state.server.params), data,
                                        client_ids, key, **round_inputs)
    server, metrics = self._global.apply(state.server, data, client_ids, key, **round_inputs)
    metrics = {**metrics, "personal_train_loss": pm["train_loss"], "personal_train_accuracy": pm["train_accuracy"]}
    return DittoState(server, personal._replace(algorithm_state=server.params)), metrics

  def communication_bytes(self, state: DittoState) -> tuple[int, int]:
    """FedAvg's bytes: the personal pass sends nothing."""
    return self._global.communication_bytes(state.server)


@dataclasses.dataclass(frozen=True)
class DittoOnePass(ftl.Hooks):
  """Ditto as one algorithm in one pass: ``FedAvg(local, hooks=DittoOnePass(lam, lr))``, ``init(..., num_clients=N)``.

  Each local step trains the global model as FedAvg and, on the same batch, the client's personal model ``v`` (its
  row) by SGD: ``v <- v - lr (grad F_k(v) + lam (v - w^t))`` with ``w^t`` the model the client received (Algorithm
  1 of the paper). One pass over the data instead of :class:`Ditto`'s two rounds, one state (FedAvg's), any
  aggregator or transform for the global model. The personal steps run the model in inference mode (the loss
  hook's ``apply``): the same as :class:`Ditto` for models without BatchNorm (``tests/test_framework.py``); with
  BatchNorm use :class:`Ditto`. Personal models: :func:`personal_params`.
  """

  lam: float = 0.1
  lr: float = 0.1

  def __post_init__(self):
    if not self.lam >= 0 or not self.lr > 0:
      raise ValueError(f"Ditto needs lam >= 0 and lr > 0, got {self.lam}, {self.lr}.")

  def client_init(self, params):
    return params  # the personal model v

  def start(self, ctx):
    return ctx.client_state

  def loss(self, loss, batch, params, v, ctx, t):
    g = jax.grad(lambda q: batch.objective(batch.apply(q)))(v)
    v = jax.tree.map(lambda p, gg, w: p - self.lr * (gg + self.lam * (p - w)), v, g, ctx.global_params)
    return loss, jax.lax.stop_gradient(v)

  def finish(self, delta, params, state, ctx, steps):
    return delta, None, state


def personal_params(state):
  """Every client's personal model of a :class:`DittoOnePass` run, stacked ``[num_clients, ...]`` (with the
  frozen params: a full model per client, for ``evaluate_per_client``)."""
  return state.per_client_models(state.algorithm_clients)

