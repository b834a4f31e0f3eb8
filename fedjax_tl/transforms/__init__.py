"""Update transforms: optax-style pure functions over client updates (see base.py)."""

from fedjax_tl.transforms.base import EmptyState, UpdateTransform, chain, identity
from fedjax_tl.transforms.privacy import clip_l2, dp_fedavg, gaussian_noise

__all__ = ["UpdateTransform", "EmptyState", "chain", "identity", "clip_l2", "gaussian_noise", "dp_fedavg"]
