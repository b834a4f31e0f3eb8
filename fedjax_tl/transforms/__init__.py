"""Update transforms: optax-style pure functions over client updates (see base.py).

Submodules: ``compression`` (qsgd, int8, top_k, random_k, scaled_sign, error_feedback, parse) and ``privacy``
(clip_l2, gaussian_noise, dp_fedavg). Adaptive clipping and secure aggregation are aggregators
(:mod:`fedjax_tl.aggregators`); their old names here (``AdaptiveClipping``, ``SecureAggregation``, and the modules
``adaptive_clip`` and ``secure_agg``) still work, loaded when first used, so the transforms import no aggregator.
"""

import importlib

from fedjax_tl.transforms import compression
from fedjax_tl.transforms.base import EmptyState, UpdateTransform, chain, encoded_bits, identity, stateless
from fedjax_tl.transforms.privacy import clip_l2, dp_fedavg, gaussian_noise

__all__ = ["UpdateTransform", "EmptyState", "chain", "identity", "stateless", "encoded_bits", "clip_l2",
           "gaussian_noise", "dp_fedavg", "compression"]

# Old names, documented with the aggregators.
_MOVED = {"AdaptiveClipping": "fedjax_tl.aggregators.dp", "SecureAggregation": "fedjax_tl.aggregators.secure"}


def __getattr__(name: str):
  if name in _MOVED:
    return getattr(importlib.import_module(_MOVED[name]), name)
  raise AttributeError(f"module 'fedjax_tl.transforms' has no attribute {name!r}")
