"""Transfer strategies as regexes of trainable params for backbone+head models (``ClassifierHead``)."""

from __future__ import annotations

import re

__all__ = ["trainable_pattern", "lora_rank", "STRATEGIES"]

STRATEGIES = ("full", "head", "bn+head", "last:K", "lora:R")


def trainable_pattern(strategy: str, num_stages: int = 4) -> str | None:
  """The ``FedAvg(trainable=...)`` regex for a strategy.

  * ``full`` - fine-tune everything (None: all params trainable);
  * ``head`` - linear probe / head only: the new Dense layers under ``head*``;
  * ``bn+head`` - the head plus every BatchNorm scale and bias of the backbone (``*_bn/``): a few thousand
    parameters that re-normalise the pretrained features for the new data;
  * ``last:K`` - the head plus the last K residual stages of the backbone (``backbone/conv5_*`` is the last
    stage of a ResNet; K = num_stages is everything but the stem);
  * ``lora:R`` - rank-R LoRA adapters on every convolution plus the head, the pretrained weights frozen
    underneath (the model must be wrapped with :func:`fedjax_tl.lora`; see :func:`lora_rank`).
  Frozen params are neither trained nor communicated.
  """
  if strategy == "full":
    return None
  if strategy == "head":
    return r"^head"
  if strategy == "bn+head":
    return r"^head|_bn/"
  if lora_rank(strategy):
    from fedjax_tl.models.peft import LORA_AND_HEAD

    return LORA_AND_HEAD
  m = re.fullmatch(r"last:(\d+)", strategy)
  if m:
    k = int(m.group(1))
    if not 1 <= k <= num_stages:
      raise ValueError(f"last:K needs 1 <= K <= {num_stages}, got {strategy!r}.")
    stages = "|".join(str(s) for s in range(num_stages + 2 - k, num_stages + 2))
    return rf"^(head|backbone/conv({stages})_)"
  raise ValueError(f"Unknown transfer strategy {strategy!r}; choose 'full', 'head', 'bn+head', 'last:K' or "
                   "'lora:R'.")


def lora_rank(strategy: str) -> int:
  """R for ``lora:R`` (>= 1), else 0."""
  m = re.fullmatch(r"lora:(\d+)", strategy)
  if not m:
    return 0
  if int(m.group(1)) < 1:
    raise ValueError(f"lora:R needs a rank R >= 1, got {strategy!r}.")
  return int(m.group(1))
