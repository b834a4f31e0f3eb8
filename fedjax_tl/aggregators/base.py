"""The aggregator protocol and the plain (weighted) mean: what happens between the clients' updates and the
server's mean update.

An aggregator is a frozen (hashable) object with an optax-like pair of pure functions around the reduction
over clients, plus two host-side hooks for protocols that need them (secure aggregation's key agreement and
mask recovery). Like pfl-research's postprocessors, the algorithm never knows which mechanism it runs:

    state                 = agg.init(template)                                    server state (checkpointed)
    shared, host          = agg.setup(state, num_clients, padded, max_weight, key)  host, once per round
    message, weight, mets = agg.encode(delta, num_examples, state, shared, ctx)   traced, per client (vmapped)
        (the execution layer reduces: sum_i weight_i * message_i, and sum_i weight_i; unsigned integer
         messages are summed unweighted modulo 2^bits)
    total, weight, info   = agg.aggregate(message_sum, weight_sum, shared, host)  host; total None = aborted
    mean, state, metrics  = agg.decode(total, weight, state, client_metrics, real, key)   traced, server side
    agg.bits(template)    -> exact uplink bits per client, or None: what the update transform sends

``ctx`` is the client's :class:`~fedjax_tl.core.execution.ClientContext` (client id, cohort position, its own
key); ``real`` marks the real clients of the padded cohort; ``key`` is the round's "aggregator" stream
(:mod:`fedjax_tl.keys`). Update transforms (compression, clipping as a transform) run on each client's delta
*before* ``encode``, so any transform composes with any aggregator.

This module holds the protocol and :class:`Mean` (``WeightedMean()`` = FedAvg, ``UniformMean()``), all an
algorithm needs to import. It imports no other layer of the library than its floor (types), so the round (core)
imports it without importing a privacy mechanism; those are its siblings :mod:`~fedjax_tl.aggregators.dp`
(``DPFedAvg``, ``AdaptiveClipping``) and :mod:`~fedjax_tl.aggregators.secure` (``SecureAggregation``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from fedjax_tl.types import PRNGKey, Updates

__all__ = ["Aggregator", "Mean", "WeightedMean", "UniformMean", "WEIGHTINGS", "client_weight", "mean_of"]

WEIGHTINGS = ("num_examples", "uniform")


class Aggregator(Protocol):
  """The aggregation protocol (see the module docstring); implementations are frozen dataclasses."""

  def init(self, template: Updates) -> Any: ...

  def setup(self, state: Any, num_clients: int, padded: int, max_weight: float, key: PRNGKey) -> tuple[Any, Any]: ...

  def encode(self, delta: Updates, num_examples: jax.Array, state: Any, shared: Any, ctx) -> tuple: ...

  def aggregate(self, message_sum: Any, weight_sum: jax.Array, shared: Any, host: Any) -> tuple: ...

  def decode(self, total: Updates, weight_sum: jax.Array, state: Any, client_metrics: dict, real: jax.Array,
             key: PRNGKey) -> tuple[Updates, Any, dict]: ...

  def bits(self, template: Updates) -> int | None: ...


def client_weight(weighting: str, num_examples: jax.Array, client_id: jax.Array) -> jax.Array:
  """A client's aggregation weight: its number of examples (FedAvg), or 1 for every real client of the cohort,
  also one without examples, which sends a zero update (the mean is over the cohort, as DP's sensitivity needs)."""
  if weighting == "uniform":
    return (client_id >= 0).astype(jnp.float32)
  return num_examples


def mean_of(total: Updates, weight_sum: jax.Array) -> Updates:
  """The weighted mean from the weighted sum (float32 sums, cast back to the update's dtype)."""
  w = jnp.maximum(weight_sum, 1e-12)
  return jax.tree.map(lambda d: d / w, total)


@dataclasses.dataclass(frozen=True)
class Mean:
  """The (weighted) mean of the clients' updates: ``weighting`` "num_examples" is FedAvg (McMahan et al. 2017),
  "uniform" weighs every client of the cohort 1."""

  weighting: str = "num_examples"

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")

  def init(self, template):
    del template
    return None

  def setup(self, state, num_clients, padded, max_weight, key):
    del state, num_clients, padded, max_weight, key
    return None, None

  def encode(self, delta, num_examples, state, shared, ctx):
    del state, shared
    return delta, client_weight(self.weighting, num_examples, ctx.client_id), {}

  def aggregate(self, message_sum, weight_sum, shared, host):
    del shared, host
    return message_sum, weight_sum, {}

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    del client_metrics, real, key
    return mean_of(total, weight_sum), state, {}

  def bits(self, template):
    del template
    return None


def WeightedMean() -> Mean:  # noqa: N802 (reads as a class)
  """FedAvg's mean, weighted by the clients' numbers of examples."""
  return Mean("num_examples")


def UniformMean() -> Mean:  # noqa: N802
  """The plain mean over the cohort's clients."""
  return Mean("uniform")
