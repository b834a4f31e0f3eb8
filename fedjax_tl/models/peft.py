"""Parameter-efficient transfer: LoRA-style low-rank adapters on any model's kernels (Hu et al. 2022, "LoRA:
Low-Rank Adaptation of Large Language Models", applied to convolutions as in e.g. Zhong et al. 2024's conv-LoRA).

:func:`lora` wraps any :class:`~fedjax_tl.Model`: each kernel ``W`` (shape ``[..., c_in, c_out]``; a convolution's
``[kh, kw, c_in, c_out]``) whose path matches ``target`` gets factors ``A [fan_in, r]`` and ``B [r, c_out]``
(``fan_in`` = the product of the other dimensions) and the model runs with ``W + (alpha / r) * reshape(A @ B)``.
``B`` starts at zero, so the wrapped model computes exactly what the pretrained one does until it is trained.

Params are ``{"base": the model's own params, "lora": the factors under the same paths}``: the pretrained weights
load into ``base`` unchanged (:meth:`LoRA.attach`), and federated fine-tuning trains and sends only what
``trainable`` names, e.g. ``FedAvg(..., trainable=LORA_AND_HEAD)`` (the factors and the ``head*`` layers), so the
uplink is the factors' size (counted exactly by ``communication_bytes``) instead of the network's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable  # noqa: F401 (pdoc resolves the inherited Model fields' annotations here)
from typing import Any  # noqa: F401

import flax.linen as nn  # noqa: F401
import jax
import jax.numpy as jnp
from flax import traverse_util

from fedjax_tl.models.base import Model
from fedjax_tl.types import Params, PRNGKey

__all__ = ["LoRA", "lora", "LORA_AND_HEAD", "CONV_KERNELS"]

LORA_AND_HEAD = r"^lora/|^base/head"  # trainable: the adapters and the classifier head (ClassifierHead, CNN)
CONV_KERNELS = r"(^|/)[^/]*conv[^/]*/kernel$"  # the library ResNets' "<layer>_conv/kernel" and CNN "conv<k>/kernel"


@dataclasses.dataclass(frozen=True)
class LoRA(Model):
  """A model with low-rank adapters on the kernels matching ``target`` (build it with :func:`lora`).

  Attributes (besides :class:`~fedjax_tl.Model`'s):
    rank: the adapters' rank r (>= 1).
    target: regex searched in each '/'-joined param path; matching params with >= 2 dimensions get adapters.
    alpha: scale numerator: the update is ``(alpha / rank) * A @ B`` (default ``alpha = rank``: scale 1).
  """

  rank: int = 4
  target: str = CONV_KERNELS
  alpha: float | None = None

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def _targets(self, base: Params) -> dict:
    pattern = re.compile(self.target)
    flat = traverse_util.flatten_dict(base)
    hits = {k: v for k, v in flat.items() if pattern.search("/".join(k)) and jnp.ndim(v) >= 2}
    if not hits:
      raise ValueError(f"LoRA target {self.target!r} matches no kernel with >= 2 dimensions; paths look like "
                       f"{['/'.join(k) for k in list(flat)[:6]]}.")
    return hits

  def attach(self, base: Params, key: PRNGKey) -> Params:
    """``{"base": base, "lora": factors}``: A ~ N(0, 1/fan_in) (as the kernels' own LeCun scale), B = 0."""
    factors = {}
    for i, (path, w) in enumerate(sorted(self._targets(base).items())):
      fan_in, c_out = math.prod(w.shape[:-1]), w.shape[-1]
      r = min(self.rank, fan_in, c_out)
      a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, r), jnp.float32) / math.sqrt(fan_in)
      factors[path] = {"a": a.astype(w.dtype), "b": jnp.zeros((r, c_out), w.dtype)}
    return {"base": base, "lora": traverse_util.unflatten_dict(factors)}

  def merge(self, params: Params) -> Params:
    """The base model's params with every adapted kernel replaced by ``W + scale * reshape(A @ B)``."""
    flat = traverse_util.flatten_dict(params["base"])
    factors = traverse_util.flatten_dict(params["lora"], sep=None)
    by_kernel: dict = {}
    for path, v in factors.items():
      by_kernel.setdefault(path[:-1], {})[path[-1]] = v
    for path, ab in by_kernel.items():
      w = flat[path]
      flat[path] = w + (self.scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)

  def init(self, key: PRNGKey):
    base, state = super().init(key)
    return self.attach(base, jax.random.fold_in(key, 1)), state

  def apply(self, params: Params, state, x, *, train: bool, mask=None, rng=None):
    return super().apply(self.merge(params), state, x, train=train, mask=mask, rng=rng)


def lora(model: Model, rank: int = 4, target: str = CONV_KERNELS, alpha: float | None = None) -> LoRA:
  """``model`` with rank-``rank`` adapters on the kernels matching ``target`` (default: every convolution)."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(Model)}
  return LoRA(**fields, rank=rank, target=target, alpha=alpha)
