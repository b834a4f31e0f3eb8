"""Personalization by parameters the clients keep: FedPer, FedRep and FedBN, as FedAvg configurations.

* FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): a personal head over a
  shared body; every local step trains both; only the body is sent and averaged.
* FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning", ICML):
  the same split, but local training first runs ``head_steps`` steps on the head alone (body fixed), then the
  remaining steps on the body alone (head fixed). ``head_steps`` equal to all the steps keeps the body fixed.
* FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR):
  every BatchNorm layer stays local: its running statistics and its scale and bias.

The personal parameters live per client in ``ServerState.client_params`` (``state.all_client_params()`` gives
every client's model for :func:`~fedjax_tl.evaluate_per_client`); they are never sent, so the uplink counts the
shared part only.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["fedper", "fedrep", "fedbn", "HeadThenBody", "BN_PARAMS"]

BN_PARAMS = r"(^|/)[^/]*bn/|BatchNorm"  # the library ResNets' "<layer>_bn/bn/{scale,bias}", flax's BatchNorm_k


def fedper(local: ftl.LocalTraining, head: str = "^head/", **fedavg_kwargs) -> ftl.FedAvg:
  """FedPer: the params matching ``head`` are each client's own."""
  return ftl.FedAvg(local, local_params=head, **fedavg_kwargs)


@dataclasses.dataclass(frozen=True)
class HeadThenBody(ftl.Hooks):
  """FedRep's local phases: steps ``t < head_steps`` update only the params matching ``head``, later steps only
  the others (the gradient of the fixed part is zeroed, so any optax optimizer leaves it in place)."""

  head: str
  head_steps: int

  def grads(self, grads, params, state, ctx, t):
    pattern = re.compile(self.head)

    def phase(path, g):
      is_head = bool(pattern.search("/".join(str(getattr(k, "key", k)) for k in path)))
      train = (t < self.head_steps) if is_head else (t >= self.head_steps)
      return jnp.where(train, g, jnp.zeros_like(g))

    return jax.tree_util.tree_map_with_path(phase, grads), state


def fedrep(local: ftl.LocalTraining, head_steps: int, head: str = "^head/", **fedavg_kwargs) -> ftl.FedAvg:
  """FedRep: ``head_steps`` local steps on the personal head, then the rest of the local steps on the body."""
  if head_steps < 0:
    raise ValueError(f"FedRep's head_steps must be >= 0, got {head_steps}.")
  return ftl.FedAvg(local, local_params=head, hooks=HeadThenBody(head, head_steps), **fedavg_kwargs)


def fedbn(local: ftl.LocalTraining, bn: str = BN_PARAMS, **fedavg_kwargs) -> ftl.FedAvg:
  """FedBN: BatchNorm statistics (``model_state="local"``) and BatchNorm scale/bias (``local_params=bn``) stay
  with each client."""
  return ftl.FedAvg(local, model_state="local", local_params=bn, **fedavg_kwargs)
