"""The server state of a FedAvg round (any algorithm's): the global model, the server optimizer's state, one row per
client in one store, the aggregator's and the algorithm's state; and the view of it the hooks' server side sees."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_tl.core.client import merge_params
from fedjax_tl.core.hooks import ServerView
from fedjax_tl.types import ModelState, OptState, Params

__all__ = ["ServerState", "server_view"]


class ServerState(NamedTuple):
  params: Params  # trainable part of the global model
  frozen: Params  # frozen part (never trained, never sent)
  model_state: ModelState  # e.g. batch_stats
  opt_state: OptState  # server optimizer state
  round: jax.Array  # int32 scalar: rounds completed
  # Everything kept per client, one row per client of the population, stacked [num_clients, ...]
  # (:mod:`fedjax_tl.core.store`): a dict with only the parts this configuration uses, None if none:
  # "model_state" (model_state="local": the client's own BatchNorm statistics), "params" (local_params: its own
  # params), "algorithm" (the hooks' per-client state, Hooks.client_init), "uplink" (a stateful
  # client_transform's state, e.g. error-feedback residuals). Until the rows were one store these were four
  # fields, now read-only properties of the same names (client_states, client_params, algorithm_clients,
  # transform_states); fedjax_tl.checkpoint restores checkpoints of that layout (LEGACY_CLIENT_ROWS).
  clients: Any = None
  server_transform_state: Any = None  # stateful server_transform's state
  aggregator_state: Any = None  # the aggregator's server state (e.g. adaptive clipping's clip norm)
  algorithm_state: Any = None  # the hooks' server state (Hooks.server_init)

  def _row_part(self, part: str) -> Any:
    return None if self.clients is None else self.clients.get(part)

  @property
  def client_states(self) -> ModelState:
    """model_state="local": every client's own model state ``[num_clients, ...]`` (``clients["model_state"]``)."""
    return self._row_part("model_state")

  @property
  def client_params(self) -> Params:
    """local_params: every client's own params ``[num_clients, ...]`` (``clients["params"]``)."""
    return self._row_part("params")

  @property
  def algorithm_clients(self) -> Any:
    """The hooks' per-client persistent state ``[num_clients, ...]`` (``clients["algorithm"]``)."""
    return self._row_part("algorithm")

  @property
  def transform_states(self) -> Any:
    """A stateful client_transform's state of every client ``[num_clients, ...]`` (``clients["uplink"]``)."""
    return self._row_part("uplink")

  def full_params(self) -> Params:
    """The global model. With ``local_params`` (FedPer, FedRep, FedBN) it has no parameters of its own for
    those layers: they are the mean over the population of the clients' own (for evaluating one global model
    on a shared test set; each client's model is :meth:`client_full_params`)."""
    params = self.params
    if self.client_params is not None:
      params = merge_params(params, jax.tree.map(lambda a: a.mean(0), self.client_params))
    return merge_params(params, self.frozen)

  def client_full_params(self, client_id: int) -> Params:
    """Client ``client_id``'s model: the global params with its own local params."""
    if self.client_params is None:
      return self.full_params()
    own = jax.tree.map(lambda a: a[client_id], self.client_params)
    return merge_params(merge_params(self.params, own), self.frozen)

  def all_client_params(self) -> Params:
    """Every client's model stacked ``[num_clients, ...]`` (``client_full_params`` of each client), for
    :func:`~fedjax_tl.core.evaluate.evaluate_per_client`; without local_params, the one global model."""
    if self.client_params is None:
      return self.full_params()
    own = jax.tree.map(jnp.asarray, self.client_params)  # (a host store's rows, read once)
    n = jax.tree.leaves(own)[0].shape[0]
    every = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)  # noqa: E731
    return self.per_client_models(merge_params(every(self.params), own))

  def per_client_models(self, trainable: Params) -> Params:
    """Full models from per-client trainable params stacked ``[N, ...]`` (an algorithm's personal models): the
    frozen params joined to every one of them, for :func:`~fedjax_tl.core.evaluate.evaluate_per_client`."""
    n = jax.tree.leaves(trainable)[0].shape[0]
    return merge_params(trainable, jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), self.frozen))

  @property
  def clip_norm(self) -> jax.Array | None:
    """Adaptive clipping's clip norm for the next round (its aggregator state)."""
    return self.aggregator_state


def server_view(state: ServerState) -> ServerView:
  """What the hooks' server side sees of the server state."""
  return ServerView(state.params, state.opt_state, state.model_state, state.round)
