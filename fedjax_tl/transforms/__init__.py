"""Update transforms: optax-style pure functions over client updates (see base.py).

Submodules: ``compression`` (qsgd, int8, top_k, random_k, scaled_sign, error_feedback, parse),
``privacy`` (clip_l2, gaussian_noise, dp_fedavg), ``adaptive_clip`` (AdaptiveClipping) and ``secure_agg``
(SecureAggregation).
"""

from fedjax_tl.transforms import compression
from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping
from fedjax_tl.transforms.base import EmptyState, UpdateTransform, chain, encoded_bits, identity
from fedjax_tl.transforms.privacy import clip_l2, dp_fedavg, gaussian_noise
from fedjax_tl.transforms.secure_agg import SecureAggregation

__all__ = ["UpdateTransform", "EmptyState", "chain", "identity", "encoded_bits", "clip_l2", "gaussian_noise",
           "dp_fedavg", "compression", "AdaptiveClipping", "SecureAggregation"]
