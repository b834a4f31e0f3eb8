"""Aggregators, in one home: what turns the cohort's updates into the server's mean update.

* :mod:`~fedjax_tl.aggregators.base` - the protocol (:class:`Aggregator`), how messages are reduced over the
  cohort (:data:`SUM`, :class:`ModularSum`), what ``aggregate`` reports (:class:`RoundInfo`) and the means:
  :class:`Mean` (``WeightedMean()`` = FedAvg, ``UniformMean()``).
* :mod:`~fedjax_tl.aggregators.dp` - :class:`DPFedAvg` (clip + Gaussian noise, McMahan et al. 2018) and
  :class:`AdaptiveClipping` (Andrew et al. 2021).
* :mod:`~fedjax_tl.aggregators.secure` - :class:`SecureAggregation` (Bonawitz et al. 2017, simulated).

DP-FTRL (:class:`fedjax_tl.privacy.dp_ftrl.DPFTRL`) is an aggregator too, kept with its accounting in
:mod:`fedjax_tl.privacy`. Pass one as ``FedAvg(aggregator=...)``; the algorithm never knows which it runs.
Layering: ``base`` imports only the floor (types), so the round (core) imports it without importing a
privacy mechanism; ``dp`` and ``secure`` import the update transforms' clipping and noise and the PRNG streams, and
load when one of their names is first used (as the flat ``fedjax_tl`` API does).
"""

import importlib

from fedjax_tl.aggregators.base import (
  SUM,
  WEIGHTINGS,
  Aggregator,
  Mean,
  Message,
  ModularSum,
  Reducer,
  RoundInfo,
  Sum,
  UniformMean,
  WeightedMean,
  client_weight,
  covers_model_state,
  mean_of,
  reduce_message,
  reducer_of,
  takes_message,
)

__all__ = ["Message", "reduce_message", "Aggregator", "Reducer",
           "Sum", "SUM", "ModularSum", "RoundInfo", "Mean", "WeightedMean", "UniformMean",
           "DPFedAvg", "AdaptiveClipping", "SecureAggregation", "WEIGHTINGS", "client_weight", "mean_of",
           "reducer_of", "covers_model_state",
           "takes_message"]

_MECHANISMS = {"DPFedAvg": "dp", "AdaptiveClipping": "dp", "SecureAggregation": "secure"}


def __getattr__(name: str):
  if name in _MECHANISMS:
    value = getattr(importlib.import_module(f"fedjax_tl.aggregators.{_MECHANISMS[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'fedjax_tl.aggregators' has no attribute {name!r}")
