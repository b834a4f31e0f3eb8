"""The aggregator protocol, how messages are reduced over the cohort, and the plain (weighted) mean.

An aggregator is a frozen (hashable) object with an optax-like pair of pure functions around the reduction
over clients, plus two host-side hooks for protocols that need them (secure aggregation's key agreement and
mask recovery). Like pfl-research's postprocessors, the algorithm never knows which mechanism it runs:

    state                 = agg.init(template)                                    server state (checkpointed)
    shared, host          = agg.setup(state, num_clients, padded, max_weight, key)  host, once per round
    message, weight, mets = agg.encode(delta, num_examples, state, shared, ctx)   traced, per client (vmapped)
        (the runner reduces the messages with agg.reducer - SUM: sum_i weight_i * message_i in float32;
         ModularSum(bits): field elements summed unweighted modulo 2^bits - and sums the weights)
    total, weight, info   = agg.aggregate(message_sum, weight_sum, shared, host)  host; info: a RoundInfo
    mean, state, metrics  = agg.decode(total, weight, state, client_metrics, real, key)   traced, server side
    agg.bits(template)    -> exact uplink bits per client, or None: what the update transform sends

and two declarations, class attributes of the aggregator:

    reducer               how its messages are summed over the cohort (:data:`SUM` or :class:`ModularSum`);
                          declared, never guessed from the messages' dtypes
    takes_message         True if ``encode`` also takes a :class:`Message` (the delta and the hooks' message
                          together, e.g. SCAFFOLD's) and ``decode`` returns one; FedAvg refuses hooks that send a
                          message to an aggregator that does not declare it
    covers_model_state    False if the model state averaged in the clear beside its messages (BatchNorm
                          statistics under ``FedAvg(model_state="average")``) would defeat it (secure
                          aggregation, DP-FTRL): FedAvg then sends the statistics inside the message's mean part
                          if the aggregator ``takes_message`` (secure aggregation masks them), else refuses

``ctx`` is the client's :class:`~fedjax_tl.core.execution.ClientContext` (client id, cohort position, its own
key); ``real`` marks the real clients of the padded cohort; ``key`` is the round's "aggregator" stream
(:mod:`fedjax_tl.keys`). ``aggregate`` returns a :class:`RoundInfo`: how many clients were heard (the uplink
bytes count them) and whether the round was aborted. Update transforms (compression, clipping as a transform)
run on each client's delta *before* ``encode``, so any transform composes with any aggregator.

This module imports no other layer of the library than its floor (types), so the round (core) imports it
without importing a privacy mechanism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fedjax_tl.types import PRNGKey, PyTree, Updates

__all__ = ["Message", "reduce_message", "takes_message", "Aggregator", "Reducer", "Sum",
           "SUM", "ModularSum", "RoundInfo", "Mean", "WeightedMean", "UniformMean",
           "WEIGHTINGS", "client_weight", "mean_of", "weighted_sum", "reducer_of", "covers_model_state"]

WEIGHTINGS = ("num_examples", "uniform")


class Message(NamedTuple):
  """What one client sends when it sends more than its delta; the aggregator sees all of it.

  ``mean`` is averaged with the client's weight (the delta); ``sum`` is summed unweighted over the cohort's real
  clients (what the algorithm's hooks send: SCAFFOLD's control-variate update, FedNova's norms). An aggregator
  encodes the whole message (DPFedAvg clips it jointly and noises both parts, SecureAggregation masks both), and
  ``decode`` returns a Message whose ``mean`` is the weighted mean and whose ``sum`` is the sum
  (:func:`mean_of`). A client that sends only its delta sends it bare, as before (the numerics of those
  configurations are unchanged).
  """

  mean: PyTree
  sum: PyTree = ()


# ---- how messages are reduced over the cohort ----
class Reducer(Protocol):
  """Sums one chunk of clients' messages (leading axis: the chunk's clients) given their weights ``[k]``; the
  runner adds the chunks' partial sums leaf by leaf (``+``, which wraps around for unsigned integers)."""

  def __call__(self, messages: PyTree, weights: jax.Array) -> PyTree: ...


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """sum_i w_i * tree_i over the leading (client) axis, in float32."""
  return jax.tree.map(lambda a: jnp.tensordot(weights, a.astype(jnp.float32), axes=1), tree)


@dataclasses.dataclass(frozen=True)
class Sum:
  """The weighted sum sum_i w_i * m_i in float32: what every (weighted) mean needs. Refuses unsigned-integer
  messages (field elements would be weighted as numbers): an aggregator that sends them declares
  :class:`ModularSum`."""

  def __call__(self, messages: PyTree, weights: jax.Array) -> PyTree:
    unsigned = [jax.tree_util.keystr(p) or "(the message)" for p, a in jax.tree_util.tree_leaves_with_path(messages)
                if jnp.issubdtype(a.dtype, jnp.unsignedinteger)]
    if unsigned:
      raise TypeError(f"The aggregator's messages have unsigned-integer leaves {unsigned[:3]}, but it declares the "
                      "weighted float sum (reducer = SUM, the default). Field elements are summed modulo 2^bits: "
                      "declare reducer = ModularSum(bits) on the aggregator.")
    return weighted_sum(messages, weights)


SUM = Sum()


def reduce_message(reducer: Reducer, messages: PyTree, weights: jax.Array, real: jax.Array) -> PyTree:
  """The reducer's sum of one chunk's wire messages. A :class:`Message` under a weighted reducer (:class:`Sum`)
  has its ``mean`` part weighted by ``weights`` and its ``sum`` part by ``real`` (1 for a real client, 0 for
  padding); other reducers (field elements, which carry their weights inside) sum the whole message."""
  if isinstance(messages, Message) and isinstance(reducer, Sum):
    return Message(reducer(messages.mean, weights), reducer(messages.sum, real))
  return reducer(messages, weights)


@dataclasses.dataclass(frozen=True)
class ModularSum:
  """Field elements summed unweighted modulo 2^bits (secure aggregation's masked vectors, which carry their
  weight inside): every leaf must be ``uint{bits}``, whose wrap-around is the modulus."""

  bits: int = 32

  def __call__(self, messages: PyTree, weights: jax.Array) -> PyTree:
    del weights
    want = jnp.dtype(f"uint{self.bits}")
    wrong = [f"{jax.tree_util.keystr(p)}: {a.dtype}" for p, a in jax.tree_util.tree_leaves_with_path(messages)
             if a.dtype != want]
    if wrong:
      raise TypeError(f"ModularSum({self.bits}) sums field elements of dtype {want}, got {wrong[:3]}.")
    return jax.tree.map(lambda a: jnp.sum(a, axis=0, dtype=a.dtype), messages)


# ---- what aggregate tells the round ----
@dataclasses.dataclass(frozen=True)
class RoundInfo(Mapping):
  """What ``aggregate`` reports besides the total (host side).

  Attributes:
    senders: the clients whose messages reached the server (the round's uplink bytes count them); None: every
      real client of the cohort.
    aborted: no total could be formed (e.g. too few secure-aggregation survivors to unmask): the round changes
      nothing but the round count.
    metrics: host-side round metrics (e.g. ``secagg_survivors``), reported with the round's.

  A read-only mapping of ``metrics``, so code written when ``aggregate`` returned a dict (``{**info}``) reads it.
  """

  senders: int | None = None
  aborted: bool = False
  metrics: dict = dataclasses.field(default_factory=dict)

  __hash__ = None  # unhashable: its metrics are a dict

  def __getitem__(self, key: str) -> Any:
    return self.metrics[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self.metrics)

  def __len__(self) -> int:
    return len(self.metrics)

  @classmethod
  def of(cls, total: Any, info: RoundInfo | Mapping | None) -> RoundInfo:
    """The RoundInfo of ``aggregate``'s result, also from an aggregator written for the dict protocol (its
    ``"senders"`` key, a None total for an aborted round)."""
    if not isinstance(info, RoundInfo):
      metrics = dict(info or {})
      info = cls(metrics.pop("senders", None), False, metrics)
    return dataclasses.replace(info, aborted=True) if total is None and not info.aborted else info


# ---- the protocol ----
class Aggregator(Protocol):
  """The aggregation protocol (see the module docstring); implementations are frozen dataclasses that declare
  ``reducer`` and ``covers_model_state`` as class attributes."""

  reducer: Reducer
  covers_model_state: bool

  def init(self, template: Updates) -> Any: ...

  def setup(self, state: Any, num_clients: int, padded: int, max_weight: float, key: PRNGKey) -> tuple[Any, Any]: ...

  def encode(self, delta: Updates, num_examples: jax.Array, state: Any, shared: Any, ctx) -> tuple: ...

  def aggregate(self, message_sum: Any, weight_sum: jax.Array, shared: Any, host: Any) -> tuple[Any, jax.Array,
                                                                                                   RoundInfo]: ...

  def decode(self, total: Updates, weight_sum: jax.Array, state: Any, client_metrics: dict, real: jax.Array,
             key: PRNGKey) -> tuple[Updates, Any, dict]: ...

  def bits(self, template: Updates) -> int | None: ...


def reducer_of(aggregator: Any) -> Reducer:
  """``aggregator.reducer``. One written before the protocol declared it reduces with :data:`SUM`; a wrapper
  that declares none (e.g. the privacy audit's ``CanaryAggregator``) reduces as the aggregator it wraps, its
  ``inner``."""
  reducer = getattr(aggregator, "reducer", None)
  if reducer is not None:
    return reducer
  inner = getattr(aggregator, "inner", None)
  return SUM if inner is None else reducer_of(inner)


def takes_message(aggregator: Any) -> bool:
  """``aggregator.takes_message``: whether its ``encode`` takes a :class:`Message` (delta and the hooks' message
  together) as well as a bare delta (False for one written before the protocol declared it)."""
  return bool(getattr(aggregator, "takes_message", False))


def covers_model_state(aggregator: Any) -> bool:
  """``aggregator.covers_model_state`` (True for one written before the protocol declared it)."""
  return bool(getattr(aggregator, "covers_model_state", True))


# ---- the mean ----
def client_weight(weighting: str, num_examples: jax.Array, client_id: jax.Array) -> jax.Array:
  """A client's aggregation weight: its number of examples (FedAvg), or 1 for every real client of the cohort,
  also one without examples, which sends a zero update (the mean is over the cohort, as DP's sensitivity needs)."""
  if weighting == "uniform":
    return (client_id >= 0).astype(jnp.float32)
  return num_examples


def mean_of(total: Updates, weight_sum: jax.Array) -> Updates:
  """The weighted mean from the weighted sum (float32 sums, cast back to the update's dtype); of a
  :class:`Message`, its ``mean`` part (its ``sum`` part stays the sum)."""
  if isinstance(total, Message):
    return Message(mean_of(total.mean, weight_sum), total.sum)
  w = jnp.maximum(weight_sum, 1e-12)
  return jax.tree.map(lambda d: d / w, total)


@dataclasses.dataclass(frozen=True)
class Mean:
  """The (weighted) mean of the clients' updates: ``weighting`` "num_examples" is FedAvg (McMahan et al. 2017),
  "uniform" weighs every client of the cohort 1."""

  weighting: str = "num_examples"

  reducer = SUM
  covers_model_state = True
  takes_message = True

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
    return message_sum, weight_sum, RoundInfo()

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
