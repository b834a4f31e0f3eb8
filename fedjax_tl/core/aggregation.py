"""Moved: the aggregator protocol and the mean live in :mod:`fedjax_tl.aggregators.base`; this module keeps the
old import path working."""

from fedjax_tl.aggregators.base import (
  WEIGHTINGS,
  Aggregator,
  Mean,
  UniformMean,
  WeightedMean,
  client_weight,
  mean_of,
)

__all__ = ["Aggregator", "Mean", "WeightedMean", "UniformMean", "WEIGHTINGS", "client_weight", "mean_of"]
