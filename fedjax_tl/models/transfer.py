"""Transfer strategies as regexes of trainable params for backbone+head models (``ClassifierHead``)."""

from __future__ import annotations

import re

__all__ = ["trainable_pattern", "STRATEGIES"]

STRATEGIES = ("full", "head", "last:K")


def trainable_pattern(strategy: str, num_stages: int = 4) -> str | None:
  """The ``FedAvg(trainable=...)`` regex for a strategy.

  * ``full`` - fine-tune everything (None: all params trainable);
  * ``head`` - linear probe / head only: the new Dense layers under ``head*``;
  * ``last:K`` - the head plus the last K residual stages of the backbone (``backbone/conv5_*`` is the last
    stage of a ResNet; K = num_stages is everything but the stem).
  Frozen params are neither trained nor communicated.
  """
  if strategy == "full":
    return None
  if strategy == "head":
    return r"^head"
  m = re.fullmatch(r"last:(\d+)", strategy)
  if m:
    k = int(m.group(1))
    if not 1 <= k <= num_stages:
      raise ValueError(f"last:K needs 1 <= K <= {num_stages}, got {strategy!r}.")
    stages = "|".join(str(s) for s in range(num_stages + 2 - k, num_stages + 2))
    return rf"^(head|backbone/conv({stages})_)"
  raise ValueError(f"Unknown transfer strategy {strategy!r}; choose 'full', 'head' or 'last:K'.")
