"""Parameters trained and sent per client per round for each transfer strategy, for the cifar10 experiment's
ResNet50 + Dense(128) + Dense(10) (shapes only: nothing is computed or downloaded).

    python experiments/transfer_bytes.py
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import fedjax_tl as ftl
from fedjax_tl.core.params import split_params
from fedjax_tl.models import resnet, transfer


def main() -> None:
  model = ftl.Model(resnet.ClassifierHead(resnet.ResNet50(), num_classes=10, hidden=(128,)), (32, 32, 3))
  params, state = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
  print(f"ResNet50 + head: {count(params):,} params, {count(state):,} BatchNorm statistics\n")
  print("| --strategy | params trained and sent | MB up per client per round (float32) |\n|---|---|---|")
  for strategy in ("full", "last:1", "bn+head", "head", "lora:4", "lora:16"):
    p = params
    if transfer.lora_rank(strategy):
      wrapped = ftl.lora(model, rank=transfer.lora_rank(strategy))
      p = jax.eval_shape(lambda w=wrapped: w.attach(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params),
                                                    jax.random.PRNGKey(0)))
    pattern = transfer.trainable_pattern(strategy)
    sent = count(p if pattern is None else split_params(p, pattern)[0])
    print(f"| {strategy} | {sent:,} | {4 * sent / 1e6:.2f} |")


if __name__ == "__main__":
  main()
