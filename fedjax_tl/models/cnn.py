"""Small CNNs for the offline demo, tests and the CPU benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class CNN(nn.Module):
  """conv3x3(f) - relu - maxpool2 per entry of ``features``, then dense(hidden) - relu - dense(num_classes).

  ``features=(32, 64), hidden=128`` is the benchmark CNN of the performance issue (workload P).
  The optional head name lets transfer learning swap the classifier (``dont_load`` regex ``head/.*``).
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  pool: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask  # no normalisation or dropout
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), name=f"conv{i}")(x))
      if self.pool:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_classes, name="head")(x)
