"""The algorithm protocol's extension points: what an algorithm changes in FedAvg's round, as one object.

A round of :class:`~fedjax_tl.FedAvg` is broadcast -> local training on every cohort client -> what each client
sends -> aggregation -> server update. :class:`Hooks` lets an algorithm replace the pieces around that loop
without touching it (learn from FedJAX's client/server split and optax's pure init/update pairs):

    server side (jitted, on the server)                client side (traced, vmapped over the cohort)
    server_init(params)            -> its state        client_init(params)       -> one client's persistent state
    broadcast(state, params)       -> sent besides     start(ctx)                -> local-training state
                                      the params       grads(grads, params, s, ctx, t) -> (grads, s)  every step
    server_update(state, mean_delta, message_sum,      finish(delta, params, s, ctx, steps)
                  cohort, population, client_metrics)      -> (delta, message, new persistent state)
        -> (mean_delta for the server optimizer, new state)

``ctx`` is a :class:`TrainContext`: the params the client received, what the server broadcast, the client's own
persistent state (kept for the whole population in the :mod:`~fedjax_tl.core.store` inside the server state,
gathered for the cohort and scattered back in one place, checkpointed with the rest), its client id, its number
of examples and the round. The ``message`` (any pytree, e.g. SCAFFOLD's control-variate update) is summed over the
cohort's real clients, unweighted (a hook that wants a weighted mean sends ``w * x`` and ``w``), and counted in the
uplink bytes as float32; what the server broadcasts is counted in the downlink bytes. A client without examples runs no
step (``steps == 0``); its hooks should leave its persistent state unchanged.

The defaults are FedAvg's (nothing extra is kept, sent or changed), so a subclass overrides only what its
algorithm needs; it must be a frozen dataclass (hashable: it is part of the compiled programs' configuration;
``FedAvg`` names an unhashable field at construction, and checks what the hooks return against this contract once,
by shape, at ``init`` and when it traces the round).
SCAFFOLD in ~25 lines is :mod:`fedjax_tl.algorithms.scaffold`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from fedjax_tl.tree import tree_bits
from fedjax_tl.types import Params, PyTree

__all__ = ["Hooks", "TrainContext", "tree_bits"]  # tree_bits: re-exported from fedjax_tl.tree, its home


class TrainContext(NamedTuple):
  """What a client's hooks see (fields are per client under vmap)."""

  global_params: Params  # the trainable params the client received this round (its starting point)
  server: Any  # what the server broadcast besides the params (Hooks.broadcast), None if nothing
  client_state: Any  # this client's persistent state (Hooks.client_init's structure), None if none is kept
  client_id: jax.Array  # int32 scalar (-1 for a padding client)
  round: jax.Array  # int32 scalar: rounds completed before this one
  num_examples: jax.Array = None  # int32 scalar: the client's number of training examples


@dataclasses.dataclass(frozen=True)
class Hooks:
  """FedAvg's behaviour at every extension point; subclass (as a frozen dataclass) and override what changes."""

  # ---- state ----
  def server_init(self, params: Params) -> Any:
    """The algorithm's server-side state (checkpointed in ``ServerState.algorithm_state``)."""
    return None

  def client_init(self, params: Params) -> Any:
    """One client's initial persistent state (kept for every client of the population), or None."""
    return None

  # ---- server -> clients ----
  def broadcast(self, state: Any, params: Params) -> Any:
    """What the server sends every client besides the params (counted in the downlink), or None."""
    return None

  def broadcast_bits(self, sent: PyTree) -> int:
    """Downlink bits of ``broadcast``'s result (float32 unless overridden; 0 if the clients already hold it)."""
    return tree_bits(sent)

  # ---- local training (per client) ----
  def start(self, ctx: TrainContext) -> Any:
    """The client's local-training state at the start of the round (seen and updated by ``grads``)."""
    return None

  def grads(self, grads: Params, params: Params, state: Any, ctx: TrainContext, t: jax.Array) -> tuple[Params, Any]:
    """Changes the loss gradient of local step ``t`` before the client optimizer sees it."""
    return grads, state

  def finish(self, delta: Params, params: Params, state: Any, ctx: TrainContext,
             steps: jax.Array) -> tuple[Params, Any, Any]:
    """(delta to send, extra message to send, new persistent state) after ``steps`` local steps (int32)."""
    return delta, None, ctx.client_state

  # ---- server update ----
  def server_update(self, state: Any, mean_delta: Params, message_sum: Any, cohort_size: jax.Array,
                    num_clients: jax.Array, client_metrics: dict) -> tuple[Params, Any]:
    """(mean delta for the server optimizer, new algorithm state) from the aggregated delta and the sum of the
    clients' messages; ``cohort_size`` counts the round's real clients, ``num_clients`` the population (int32
    scalars); ``client_metrics`` holds per-client arrays ``[C]`` (loss, accuracy, num_examples; padding clients
    last, with 0 examples)."""
    return mean_delta, state
