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

__all__ = ["Hooks", "TrainContext", "ServerView", "LossBatch", "ChainHooks", "chain_hooks",
           "tree_bits"]  # tree_bits: re-exported from fedjax_tl.tree, its home


class TrainContext(NamedTuple):
  """What a client's hooks see (fields are per client under vmap)."""

  global_params: Params  # the trainable params the client received this round (its starting point)
  server: Any  # what the server broadcast besides the params (Hooks.broadcast), None if nothing
  client_state: Any  # this client's persistent state (Hooks.client_init's structure), None if none is kept
  client_id: jax.Array  # int32 scalar (-1 for a padding client)
  round: jax.Array  # int32 scalar: rounds completed before this one
  num_examples: jax.Array = None  # int32 scalar: the client's number of training examples
  choice: jax.Array = None  # int32 scalar: which of Hooks.candidates the client started from (None without them)


class LossBatch(NamedTuple):
  """What :meth:`Hooks.loss` sees of a local step's batch."""

  outputs: Any  # the model's outputs for the batch (logits, or a dict with "logits" and e.g. "features")
  targets: Any  # the batch's targets
  mask: jax.Array  # bool [B]: real examples (padding rows are False)
  apply: Any  # q -> the model's outputs on this batch with other trainable params q (inference mode), e.g. the
  # global model's or the client's previous model's representation
  objective: Any = None  # outputs -> the objective's mean loss over this batch (for a second model's own loss)


class ServerView(NamedTuple):
  """What the server side of the hooks sees of the server state (:meth:`Hooks.broadcast_from`,
  :meth:`Hooks.server_update_from`): e.g. MimeLite-style algorithms that send the server optimizer's state."""

  params: Params  # the trainable params (before this round's update in server_update_from)
  opt_state: Any  # the server optimizer's state
  model_state: Any  # the global model state (e.g. BatchNorm statistics)
  round: jax.Array  # int32 scalar: rounds completed


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

  def broadcast_from(self, state: Any, server: ServerView) -> Any:
    """What the server sends every client besides the params, seeing the whole server state (its params, its
    optimizer's state, the model state, the round). Default: :meth:`broadcast` of the params."""
    return self.broadcast(state, server.params)

  def broadcast_bits(self, sent: PyTree) -> int:
    """Downlink bits of ``broadcast``'s result (float32 unless overridden; 0 if the clients already hold it)."""
    return tree_bits(sent)

  def message_bits(self, message: PyTree) -> int:
    """Uplink bits of ``finish``'s message (float32 unless overridden, e.g. when the message is a dense encoding
    of something smaller a real client would send)."""
    return tree_bits(message)

  @property
  def chooses_start(self) -> bool:
    """Whether the hooks offer several starting models (:meth:`candidates` is overridden)."""
    return type(self).candidates is not Hooks.candidates

  # ---- local training (per client) ----
  def candidates(self, ctx: TrainContext) -> Params | None:
    """Several models the client may start from, stacked on a leading axis ``[k, ...]`` (the trainable params'
    tree, e.g. IFCA's cluster models from ``ctx.server``), or None (start from the broadcast). The client evaluates
    each on its first local batch (inference mode, the objective's loss) and starts from the one with the lowest
    loss: ``ctx.choice`` is its index, ``ctx.global_params`` that model, and the delta is taken against it."""
    return None

  def start(self, ctx: TrainContext) -> Any:
    """The client's local-training state at the start of the round (seen and updated by ``grads``)."""
    return None

  def loss(self, loss: jax.Array, batch: LossBatch, params: Params, state: Any, ctx: TrainContext,
           t: jax.Array) -> tuple[jax.Array, Any]:
    """The loss local step ``t`` differentiates (w.r.t. ``params``), from the objective's mean ``loss`` over the
    batch and what the model computed (``batch.outputs``, ``batch.apply`` for other params); returns (loss, the
    local-training state). Default: the objective's loss. (The clients' reported metrics stay the objective's.)"""
    return loss, state

  @property
  def has_loss(self) -> bool:
    """Whether the hooks change the loss (:meth:`loss` is overridden)."""
    return type(self).loss is not Hooks.loss

  def grads(self, grads: Params, params: Params, state: Any, ctx: TrainContext, t: jax.Array) -> tuple[Params, Any]:
    """Changes the loss gradient of local step ``t`` before the client optimizer sees it. May return a third value,
    a bool scalar: True skips the step (params, optimizer and model state unchanged; not counted in ``steps``)."""
    return grads, state

  def finish(self, delta: Params, params: Params, state: Any, ctx: TrainContext,
             steps: jax.Array) -> tuple[Params, Any, Any]:
    """(delta to send, extra message to send, new persistent state) after ``steps`` local steps (int32: the steps
    taken, skipped ones excluded). May return a fourth value: a dict of the client's own scalar metrics (in the
    round's ``client_metrics``)."""
    return delta, None, ctx.client_state

  # ---- server update ----
  def server_update(self, state: Any, mean_delta: Params, message_sum: Any, cohort_size: jax.Array,
                    num_clients: jax.Array, client_metrics: dict) -> tuple[Params, Any]:
    """(mean delta for the server optimizer, new algorithm state) from the aggregated delta and the sum of the
    clients' messages; ``cohort_size`` counts the round's real clients, ``num_clients`` the population (int32
    scalars); ``client_metrics`` holds per-client arrays ``[C]`` (loss, accuracy, num_examples; padding clients
    last, with 0 examples)."""
    return mean_delta, state

  def server_update_from(self, state: Any, mean_delta: Params, message_sum: Any, cohort_size: jax.Array,
                         num_clients: jax.Array, client_metrics: dict, server: ServerView) -> tuple[Params, Any]:
    """:meth:`server_update`, seeing the server state before the update as well. Default: server_update."""
    return self.server_update(state, mean_delta, message_sum, cohort_size, num_clients, client_metrics)


@dataclasses.dataclass(frozen=True)
class ChainHooks(Hooks):
  """Several hooks as one, in a defined order (as ``optax.chain``): ``chain_hooks(a, b)``.

  The gradient of every local step goes through ``a.grads`` then ``b.grads``, the client's delta through
  ``a.finish`` then ``b.finish`` and the server's mean delta through ``a.server_update`` then ``b.server_update``;
  everything else is kept apart, each hook seeing only its own: server state, broadcast, per-client state,
  local-training state and message are tuples ``(a's, b's)``. A step is skipped if any hook skips it; client
  metrics are merged (distinct names). At most one hook may offer starting :meth:`~Hooks.candidates`.
  """

  hooks: tuple[Hooks, ...] = ()

  def __post_init__(self):
    if not self.hooks or not all(isinstance(h, Hooks) for h in self.hooks):
      raise TypeError(f"chain_hooks takes fedjax_tl.Hooks instances, got {[type(h).__name__ for h in self.hooks]}.")
    if sum(h.chooses_start for h in self.hooks) > 1:
      raise ValueError("At most one of the chained hooks may offer starting candidates (Hooks.candidates).")

  def _ctx(self, ctx: TrainContext, i: int) -> TrainContext:
    part = lambda x: None if x is None else x[i]  # noqa: E731
    return ctx._replace(server=part(ctx.server), client_state=part(ctx.client_state))

  def server_init(self, params):
    return tuple(h.server_init(params) for h in self.hooks)

  def client_init(self, params):
    return tuple(h.client_init(params) for h in self.hooks)

  def broadcast(self, state, params):
    return tuple(h.broadcast(s, params) for h, s in zip(self.hooks, state, strict=True))

  def broadcast_from(self, state, server):
    return tuple(h.broadcast_from(s, server) for h, s in zip(self.hooks, state, strict=True))

  def broadcast_bits(self, sent):
    return sum(h.broadcast_bits(x) for h, x in zip(self.hooks, sent, strict=True))

  def message_bits(self, message):
    return sum(h.message_bits(x) for h, x in zip(self.hooks, message, strict=True))

  @property
  def chooses_start(self) -> bool:
    return any(h.chooses_start for h in self.hooks)

  @property
  def has_loss(self) -> bool:
    return any(h.has_loss for h in self.hooks)

  def loss(self, loss, batch, params, state, ctx, t):
    new = []
    for i, h in enumerate(self.hooks):
      loss, s = h.loss(loss, batch, params, state[i], self._ctx(ctx, i), t)
      new.append(s)
    return loss, tuple(new)

  def candidates(self, ctx):
    for i, h in enumerate(self.hooks):
      if h.chooses_start:
        return h.candidates(self._ctx(ctx, i))
    return None

  def start(self, ctx):
    return tuple(h.start(self._ctx(ctx, i)) for i, h in enumerate(self.hooks))

  def grads(self, grads, params, state, ctx, t):
    new, skip = [], None
    for i, h in enumerate(self.hooks):
      out = h.grads(grads, params, state[i], self._ctx(ctx, i), t)
      grads = out[0]
      new.append(out[1])
      if len(out) == 3:
        skip = out[2] if skip is None else skip | out[2]
    return (grads, tuple(new)) if skip is None else (grads, tuple(new), skip)

  def finish(self, delta, params, state, ctx, steps):
    messages, rows, metrics = [], [], {}
    for i, h in enumerate(self.hooks):
      out = h.finish(delta, params, state[i], self._ctx(ctx, i), steps)
      delta = out[0]
      messages.append(out[1])
      rows.append(out[2])
      if len(out) == 4:
        clash = set(out[3]) & set(metrics)
        if clash:
          raise ValueError(f"Chained hooks report client metrics of the same names: {sorted(clash)}.")
        metrics.update(out[3])
    out = (delta, tuple(messages), tuple(rows))
    return (*out, metrics) if metrics else out

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    new = []
    for h, s, m in zip(self.hooks, state, message_sum, strict=True):
      mean_delta, s = h.server_update(s, mean_delta, m, cohort_size, num_clients, client_metrics)
      new.append(s)
    return mean_delta, tuple(new)

  def server_update_from(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics, server):
    new = []
    for h, s, m in zip(self.hooks, state, message_sum, strict=True):
      mean_delta, s = h.server_update_from(s, mean_delta, m, cohort_size, num_clients, client_metrics, server)
      new.append(s)
    return mean_delta, tuple(new)


def chain_hooks(*hooks: Hooks) -> ChainHooks:
  """``hooks`` applied in order (see :class:`ChainHooks`); nested chains are flattened."""
  flat = []
  for h in hooks:
    flat.extend(h.hooks if isinstance(h, ChainHooks) else (h,))
  return ChainHooks(tuple(flat))
