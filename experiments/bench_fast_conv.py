"""Per-case timing of the CPU fast-path rewrite (models/fast.py) against XLA's own lowering.

Each case is one layer's forward + backward (gradients w.r.t. input and kernel) at batch 32, run ``--steps``
times inside a ``lax.scan`` (as the ``sequential/scan:1`` schedule runs local steps) and, with ``--loop host``,
as one jitted call per step. Prints milliseconds per step for XLA and the rewrite, and their ratio.

    python experiments/bench_fast_conv.py
    python experiments/bench_fast_conv.py --cases conv1x1,maxpool --loop host
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_tl.models.fast import rewrite

# (name, input HxWxC, layer)
CASES = [
    ("conv3x3 s1 32x32x3->32", (32, 32, 3), lambda: nn.Conv(32, (3, 3))),
    ("conv3x3 s1 16x16x32->64", (16, 16, 32), lambda: nn.Conv(64, (3, 3))),
    ("conv3x3 s1 32x32x64->64", (32, 32, 64), lambda: nn.Conv(64, (3, 3))),
    ("conv3x3 s2 32x32x64->128", (32, 32, 64), lambda: nn.Conv(128, (3, 3), (2, 2), padding=((1, 1), (1, 1)))),
    ("conv3x3 s1 8x8x256->256", (8, 8, 256), lambda: nn.Conv(256, (3, 3))),
    ("conv1x1 s2 32x32x64->128", (32, 32, 64), lambda: nn.Conv(128, (1, 1), (2, 2), padding="VALID")),
    ("conv1x1 s1 16x16x128->128", (16, 16, 128), lambda: nn.Conv(128, (1, 1), padding="VALID")),
    ("maxpool2 32x32x32", (32, 32, 32), lambda: (lambda x: nn.max_pool(x, (2, 2), (2, 2)))),
]


def bench(layer, shape, fast, steps, loop, batch=32):
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape))
  if isinstance(layer, nn.Module):
    v = layer.init(jax.random.PRNGKey(1), x[:1])
    f = lambda v, x: jnp.sum(layer.apply(v, x) ** 2)  # noqa: E731
  else:
    v = {}
    f = lambda v, x: jnp.sum(layer(x) ** 2)  # noqa: E731
  f = rewrite(f) if fast else f
  g = jax.grad(f, (0, 1))

  def one(v, x):
    gv, gx = g(v, x)
    return jax.tree.map(lambda a, b: a - 1e-3 * b, v, gv), x - 1e-3 * gx

  if loop == "scan":
    run = jax.jit(lambda v, x: jax.lax.scan(lambda c, _: (one(*c), None), (v, x), None, length=steps)[0])
  else:
    step = jax.jit(one)

    def run(v, x):
      for _ in range(steps):
        v, x = step(v, x)
      return v, x
  jax.block_until_ready(run(v, x))
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(run(v, x))
    best = min(best, (time.perf_counter() - t0) / steps)
  return best * 1e3


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--cases", default="", help="only the cases whose name contains one of these (comma-separated)")
  p.add_argument("--loop", default="scan", choices=["scan", "host"])
  args = p.parse_args(argv)
  print(f"{'case':28s} {'xla ms':>8s} {'fast ms':>8s} {'xla/fast':>8s}  (loop={args.loop}, best of 3)")
  for name, shape, make in CASES:
    if args.cases and not any(c in name for c in args.cases.split(",")):
      continue
    a = bench(make(), shape, False, args.steps, args.loop)
    b = bench(make(), shape, True, args.steps, args.loop)
    print(f"{name:28s} {a:8.2f} {b:8.2f} {a / b:8.2f}", flush=True)


if __name__ == "__main__":
  main()
