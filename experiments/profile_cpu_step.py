"""Where a centralized ResNet18 training step spends its time on XLA:CPU: JAX's profiler, thunk by thunk.

Runs one ``lax.scan`` epoch (20 steps, batch 32, SGD, fast path as ``LocalTraining`` trains it) after a warm-up,
then reads the trace back (``jax._src.lib._profile_data``) and sums the executed thunks per step by kind: the
library matrix products (``dot``), the im2col ``concatenate``s, the other fusions (the im2col gradients' pad/
select/slice sums, BatchNorm, ReLU, SGD) and XLA convolutions if any. The profiler adds ~2% to the step.

    python experiments/profile_cpu_step.py [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_schedules import centralized_step, make_data  # noqa: E402
from benchmark import resnet18_model  # noqa: E402

from fedjax_tl.core.client import LocalTraining  # noqa: E402

_CORE = ("dot", "convolution", "concatenate", "pad", "slice", "select", "reduce", "transpose")


def _kind(hlo: str, name: str) -> str:
  m = re.search(r"%" + re.escape(name) + r" = \S+ ([\w-]+)\(.*", hlo)
  if not m:
    return "other"
  calls = re.search(r"calls=%([\w.-]+)", m.group(0))
  if calls:
    comp = re.search(r"%" + re.escape(calls.group(1)) + r" \(.*?\{(.*?)\n\}", hlo, re.S)
    ops = set(re.findall(r"= \S+ ([\w-]+)\(", comp.group(1))) if comp else set()
    for k in ("dot", "convolution"):
      if k in ops:
        return k
    return "fusion[" + ",".join(sorted(ops & set(_CORE))) + "]"
  return m.group(1)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--top", type=int, default=15)
  args = p.parse_args(argv)
  from jax._src.lib import _profile_data  # noqa: PLC0415

  model = resnet18_model()
  params, state = model.init(jax.random.PRNGKey(0))
  opt = optax.sgd(0.01)
  step = centralized_step(LocalTraining(model, opt, 32).train_model, state, opt)
  data = make_data(10, 64)
  x, y = jnp.asarray(data.x.reshape(-1, 32, 32, 32, 3)), jnp.asarray(data.y.reshape(-1, 32))
  steps = x.shape[0]
  epoch = jax.jit(lambda p, o, xs, ys: jax.lax.scan(lambda c, b: (step(*c, *b), None), (p, o), (xs, ys))[0])
  o = opt.init(params)
  jax.block_until_ready(epoch(params, o, x, y))
  t0 = time.perf_counter()
  jax.block_until_ready(epoch(params, o, x, y))
  print(f"unprofiled: {(time.perf_counter() - t0) / steps * 1e3:.1f} ms/step")
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    jax.block_until_ready(epoch(params, o, x, y))
    jax.profiler.stop_trace()
    pd = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    per_op = collections.Counter()
    for plane in pd.planes:
      for line in plane.lines:
        if "XLAEigen" in line.name:
          for ev in line.events:
            if ev.name != "ThunkExecutor::Execute" and not ev.name.startswith(("end:", "ThreadpoolListener")):
              per_op[ev.name] += ev.duration_ns
  hlo = epoch.lower(params, o, x, y).compile().as_text()
  kinds = collections.Counter()
  for name, ns in per_op.items():
    kinds[_kind(hlo, name)] += ns
  total = sum(kinds.values())
  print(f"thunks: {total / steps / 1e6:.1f} ms/step")
  for k, ns in kinds.most_common():
    print(f"  {ns / steps / 1e6:7.1f} ms/step  {100 * ns / total:5.1f}%  {k}")
  print("largest thunks (ms/step):")
  for name, ns in per_op.most_common(args.top):
    print(f"  {ns / steps / 1e6:7.2f}  {name}  {_kind(hlo, name)}")


if __name__ == "__main__":
  main()
