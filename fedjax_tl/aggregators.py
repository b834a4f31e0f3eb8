"""Aggregators: the protocol (:mod:`fedjax_tl.core.aggregation`) and every implementation in one place.

:class:`Mean` (``WeightedMean()`` = FedAvg, ``UniformMean()``), :class:`DPFedAvg` (clip + Gaussian noise,
McMahan et al. 2018), :class:`AdaptiveClipping` (Andrew et al. 2021) and :class:`SecureAggregation`
(Bonawitz et al. 2017). Pass one as ``FedAvg(aggregator=...)``; the algorithm never knows which it runs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fedjax_tl.core.aggregation import (  # noqa: F401 (re-exported)
  WEIGHTINGS,
  Aggregator,
  Mean,
  UniformMean,
  WeightedMean,
  client_weight,
  mean_of,
)
from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping
from fedjax_tl.transforms.privacy import add_noise, clip_by_norm
from fedjax_tl.transforms.secure_agg import SecureAggregation

__all__ = ["Aggregator", "Mean", "WeightedMean", "UniformMean", "DPFedAvg", "AdaptiveClipping", "SecureAggregation",
           "WEIGHTINGS", "client_weight", "mean_of"]


@dataclasses.dataclass(frozen=True)
class DPFedAvg:
  """DP-FedAvg with a fixed clip (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models"): every client's update is clipped to L2 norm ``clip`` (after the update transforms, so the bound
  holds for what is sent), the mean is uniform over the cohort, and it gets N(0, (noise_multiplier * clip /
  cohort_size)^2) noise on every coordinate (the aggregator key). ``clip = inf`` and ``noise_multiplier = 0``
  is plain uniform FedAvg. Account with :mod:`fedjax_tl.privacy.accounting`."""

  clip: float = 1.0
  noise_multiplier: float = 0.0
  cohort_size: int = 1
  weighting: str = "uniform"

  def __post_init__(self):
    if self.weighting != "uniform":
      raise ValueError("DP-FedAvg's sensitivity bound needs weighting='uniform'.")
    if not self.clip > 0 or self.noise_multiplier < 0 or self.cohort_size < 1:
      raise ValueError(f"Need clip > 0, noise_multiplier >= 0 and cohort_size >= 1, got {self.clip}, "
                       f"{self.noise_multiplier}, {self.cohort_size}.")

  _MEAN = Mean("uniform")

  def init(self, template):
    return self._MEAN.init(template)

  def setup(self, state, num_clients, padded, max_examples, key):
    return self._MEAN.setup(state, num_clients, padded, max_examples, key)

  def encode(self, delta, num_examples, state, shared, ctx):
    clipped, norm = clip_by_norm(delta, self.clip)
    delta, weight, _ = self._MEAN.encode(clipped, num_examples, state, shared, ctx)
    return delta, weight, {"dp_within_clip": (norm <= self.clip).astype(jnp.float32)}

  def aggregate(self, message_sum, weight_sum, shared, host):
    return self._MEAN.aggregate(message_sum, weight_sum, shared, host)

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    mean, state, metrics = self._MEAN.decode(total, weight_sum, state, client_metrics, real, key)
    if self.noise_multiplier > 0:
      mean = add_noise(mean, self.noise_multiplier * self.clip / self.cohort_size, key)
    return mean, state, metrics

  def bits(self, template):
    return self._MEAN.bits(template)
