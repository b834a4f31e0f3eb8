"""Compression during federated training: gradual magnitude pruning decided by the server, and QAT clients.

Pruning (Zhu & Gupta 2017's schedule, applied to the global model). Everything plugs into :class:`FedAvg`'s
existing slots, no change to the round itself:

  server_optimizer  ``FederatedPruning.server_optimizer(inner)``: after ``inner`` updates the global model the
                    server prunes it to the schedule's sparsity for the next round (magnitude, global or
                    layer-wise; weights pruned before stay pruned) and keeps it exactly sparse, also under server
                    momentum/Adam. The mask and the round count live in the optimizer state, so they are part of
                    ``ServerState.opt_state`` and of every checkpoint.
  local.optimizer   ``keep_pruned(client optimizer)``: the client's mask is the support of the broadcast model,
                    read when its optimizer is initialised from it every round; pruned weights get no update,
                    so its delta is exactly zero there.
  downlink          the broadcast in the COO format of :mod:`fedjax_tl.compress.report` (values + indices; the
                    indices carry the mask); lossless.
  client_transform  the uplink counted as sparse: float32 values at the broadcast's support, in its order (the
                    server knows the mask it sent, so no indices go up); lossless.

Only the trainable part of the params is pruned during training (a frozen part is never sent; prune it before
with :func:`~fedjax_tl.compress.pruning.magnitude_mask` if wanted).

QAT: ``LocalTraining(qat(model), ...)`` trains the fake-quantized model on the clients; the server keeps and
averages float32 params (see :mod:`fedjax_tl.compress.quantize`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.compress.pruning import (
  Prunable,
  apply_mask,
  is_kernel,
  keep_pruned,
  magnitude_mask,
  polynomial_sparsity,
  prunable_leaves,
)
from fedjax_tl.compress.report import sparse_bits
from fedjax_tl.core.checks import check_optimizer
from fedjax_tl.transforms.base import UpdateTransform, identity
from fedjax_tl.types import OptState, Params

__all__ = ["FederatedPruning", "PruningServerState", "sparse_uplink", "sparse_downlink"]


class PruningServerState(NamedTuple):
  inner: OptState
  mask: Params  # bool pytree like the trainable params: the current server mask (True = kept)
  count: jax.Array  # int32: server updates (rounds) done


def _lossless(bits_fn) -> UpdateTransform:
  """The identity transform, counted as ``bits_fn`` bits (the values are sent as they are, only sparsely)."""
  return identity()._replace(encoded_bits=bits_fn)


def sparse_uplink(prunable: Prunable = is_kernel) -> UpdateTransform:
  """Counts a client's delta as float32 values at the support of the broadcast model (``template`` is the
  broadcast params; the server knows the mask, so no indices), non-prunable leaves dense. Lossless: the
  client optimizer (:func:`keep_pruned`) leaves the delta exactly zero off the support."""
  def bits(template):
    flags = jax.tree.leaves(prunable_leaves(template, prunable))
    return sum(int(jnp.count_nonzero(a)) * 32 if f else a.size * 32
               for a, f in zip(jax.tree.leaves(template), flags))

  return _lossless(bits)


def sparse_downlink(prunable: Prunable = is_kernel) -> UpdateTransform:
  """Counts the broadcast in COO form (float32 value + ``ceil(log2 leaf size)``-bit index per nonzero of a
  prunable leaf, other leaves dense): the indices tell the clients the mask. Lossless."""
  return _lossless(lambda template: sparse_bits(template, prunable, 32))


@dataclasses.dataclass(frozen=True)
class FederatedPruning:
  """Server-decided gradual magnitude pruning of the global model during federated training.

  The sparsity of the model broadcast in round ``r`` (0-based) is ``polynomial_sparsity(r, ...)``: dense (or
  ``initial_sparsity``) up to ``begin_round``, ``final_sparsity`` from ``end_round`` on, updated every
  ``frequency`` rounds.

  Usage::

      fp = FederatedPruning(0.9, end_round=8)
      algo = FedAvg(**fp.fedavg_kwargs(LocalTraining(model, optax.sgd(0.05), 16), optax.sgd(1.0)))
      state = algo.init(fp.prune(params), model_state)
  """

  final_sparsity: float
  end_round: int
  begin_round: int = 0
  frequency: int = 1
  initial_sparsity: float = 0.0
  scope: str = "global"
  prunable: Prunable = is_kernel

  def __post_init__(self):
    for name in ("final_sparsity", "initial_sparsity"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
    polynomial_sparsity(0, self.final_sparsity, begin_step=self.begin_round, end_step=self.end_round,
                        frequency=self.frequency)  # validates the schedule

  def sparsity(self, round_idx) -> jax.Array:
    """Target sparsity of the model broadcast in round ``round_idx`` (0-based)."""
    return polynomial_sparsity(round_idx, self.final_sparsity, begin_step=self.begin_round,
                               end_step=self.end_round, frequency=self.frequency,
                               initial_sparsity=self.initial_sparsity)

  def prune(self, params: Params, round_idx: int = 0) -> Params:
    """``params`` pruned to the sparsity of round ``round_idx`` (the initial global model)."""
    return apply_mask(params, magnitude_mask(params, self.sparsity(round_idx), scope=self.scope,
                                             prunable=self.prunable))

  def server_optimizer(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` followed by pruning to the next round's sparsity; the mask is kept in the optimizer state."""
    check_optimizer(inner, "FederatedPruning.server_optimizer's inner optimizer", "optax.sgd(1.0)")
    def init(params):
      mask = magnitude_mask(params, self.sparsity(0), scope=self.scope, prunable=self.prunable)
      return PruningServerState(inner.init(params), mask, jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
      if params is None:
        raise ValueError("FederatedPruning.server_optimizer needs the params in update() (FedAvg passes them).")
      u, s = inner.update(grads, state.inner, params)
      new = apply_mask(optax.apply_updates(params, u), state.mask)  # pruned weights stay pruned
      count = state.count + 1
      mask = magnitude_mask(new, self.sparsity(count), scope=self.scope, prunable=self.prunable)
      pruned = apply_mask(new, mask)
      return jax.tree.map(lambda a, b: a - b, pruned, params), PruningServerState(s, mask, count)

    return optax.GradientTransformation(init, update)

  def client_optimizer(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    return keep_pruned(inner, self.prunable)

  def fedavg_kwargs(self, local, server_optimizer: optax.GradientTransformation | None = None) -> dict:
    """FedAvg keyword arguments: ``local`` with the masked client optimizer, the pruning server optimizer
    (around ``server_optimizer``, default SGD(1.0)) and the sparse down/uplink accounting."""
    return {"local": dataclasses.replace(local, optimizer=self.client_optimizer(local.optimizer)),
            "server_optimizer": self.server_optimizer(server_optimizer or optax.sgd(1.0)),
            "client_transform": sparse_uplink(self.prunable), "downlink": sparse_downlink(self.prunable)}
