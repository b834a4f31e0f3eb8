"""The performance benchmark: workloads P (small CNN), R (ResNet50) and scale, on the current backend.

    python experiments/benchmark.py --workload P --repeats 3           # CPU target workload, both shapes;
                                                                       # library CNN vs plain flax CNN
    python experiments/benchmark.py --workload resnet18                # ResNet18 CIFAR stem, 10 clients x 64
    python experiments/benchmark.py --workload torch --torch_python P  # the same ResNet18: plain PyTorch loop vs
                                                                       # JAX centralized and federated, fresh
                                                                       # processes (start-up included)
    python experiments/benchmark.py --workload R                       # ResNet50 32x32 and 224x224 (accelerator)
    python experiments/benchmark.py --workload R --dtype bfloat16      # the same in mixed precision
    python experiments/benchmark.py --workload scale --populations 10000,100000 --cohort 1000
    python experiments/benchmark.py --workload scale --populations 10000,1000000 --cohort 100 --rounds 3 \
        --personal --client_store disk --data host --max_examples 2   # per-client heads of 10^6 clients on disk
    python experiments/benchmark.py --workload hostdata --shapes 10x500,100x64   # host vs on-device data

Every federated measurement is paired with centralized training of the same model at the same batch size
in the same process, alternating within each repeat (centralized = plain optax on pre-batched device data, in
the loop form the ``auto`` schedule picks for the model, its own faster form: one ``lax.scan`` per epoch, or
one jitted step per batch for XLA convolutions on CPU), and the table reports medians over the repeats
(examples/s, rounds/s, ratio to centralized), the first round's seconds (compilation included) and peak
memory (device ``peak_bytes_in_use`` where the backend reports it, else the process's peak RSS, which on CPU
holds the data and the compiled programs too). Workload R adds the model FLOPs per example (XLA cost
analysis of the centralized step) and MFU against the device's dense bf16 peak (``--peak_tflops`` to
override; none on CPU). The scale workload runs each population in its own process (so peak RSS is its own)
and counts retraces after the first round (0 = no recompilation as cohorts' client sizes change).
Results are printed as a table and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_schedules import bench_centralized, bench_federated, centralized_step, make_data  # noqa: E402

from fedjax_tl.core.client import LocalTraining  # noqa: E402
from fedjax_tl.core.fedavg import FedAvg  # noqa: E402
from fedjax_tl.data import augment  # noqa: E402
from fedjax_tl.data.client_data import Dataset, FederatedData, HostFederatedData  # noqa: E402
from fedjax_tl.experiments.common import DTYPES, format_table  # noqa: E402
from fedjax_tl.models import resnet  # noqa: E402
from fedjax_tl.models.base import Model  # noqa: E402
from fedjax_tl.models.cnn import CNN  # noqa: E402

# Dense bf16 peak FLOP/s by device kind (vendor datasheets; SXM parts). MFU is reported against these.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_memory_mb() -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def _proc_status_mb(field: str) -> float | None:
  """VmRSS / VmHWM of this process in MB (Linux), else None."""
  try:
    with open("/proc/self/status") as f:
      line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024
  except (OSError, StopIteration):
    return None


def _reset_peak_rss() -> bool:
  """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS (Linux: clear_refs 5)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_tflops(override: float | None) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def resnet50_model(image_size: int, dtype=None) -> Model:
  module = resnet.ClassifierHead(resnet.ResNet50(dtype=dtype), num_classes=10, hidden=(128,), dtype=dtype)
  size = image_size if image_size != 32 else None
  return Model(module, (32, 32, 3), preprocess=augment.with_resize(resnet.caffe_preprocess, size))


def cnn_model() -> Model:
  return Model(CNN(num_classes=10, features=(32, 64), hidden=128, conv="auto"), (32, 32, 3))


class PlainCNN(nn.Module):
  """The workload-P CNN as a user writes it in flax.linen (nn.Conv, nn.max_pool, nn.Dense): same architecture
  and params as :func:`cnn_model`, none of its hand-written fast layers."""

  @nn.compact
  def __call__(self, x):
    for f in (32, 64):
      x = nn.max_pool(nn.relu(nn.Conv(f, (3, 3))(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def plain_cnn_model() -> Model:
  return Model(PlainCNN(), (32, 32, 3))


def resnet18_model() -> Model:
  """ResNet18 with the CIFAR stem (3x3/1 conv, no max pool), BatchNorm, 10 classes."""
  return Model(resnet.ClassifierHead(resnet.ResNet18(stem="small"), num_classes=10), (32, 32, 3))


# Workload-P models, benchmarked side by side: (name, model, fast_path).
P_MODELS = {"library": (cnn_model, True), "plain": (plain_cnn_model, True), "plain-xla": (plain_cnn_model, False)}


def step_flops(model: Model, batch: int, lr: float) -> float | None:
  """FLOPs of one centralized SGD step at ``batch`` (XLA cost analysis)."""
  params, state = model.init(jax.random.PRNGKey(0))
  opt = optax.sgd(lr)
  step = centralized_step(model, state, opt)
  xb = jax.ShapeDtypeStruct((batch, *model.sample_shape), np.uint8)
  yb = jax.ShapeDtypeStruct((batch,), np.int32)
  cost = jax.jit(step).lower(params, opt.init(params), xb, yb).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) or None


def paired(model_fn, data, schedule, repeats, rounds, batch, lr, fast_path=True):
  """Median over ``repeats`` of (centralized, federated) measured back to back."""
  return summarize([measure(model_fn, data, schedule, rounds, batch, lr, fast_path) for _ in range(repeats)])


def measure(model_fn, data, schedule, rounds, batch, lr, fast_path=True):
  """(centralized, federated) measured back to back."""
  c = bench_centralized(data, epochs=rounds, batch=batch, lr=lr, model=model_fn(), fast_path=fast_path)
  f = bench_federated(schedule, data, rounds, batch, lr, model=model_fn(), fast_path=fast_path)
  return c, f


def summarize(runs):
  repeats = len(runs)
  med = lambda key, i: statistics.median(r[i][key] for r in runs)
  ratios = [r[1]["examples_per_s"] / r[0]["examples_per_s"] for r in runs]
  return {
      "centralized_examples_per_s": med("examples_per_s", 0),
      "examples_per_s": med("examples_per_s", 1),
      "examples_per_s_min_max": [min(r[1]["examples_per_s"] for r in runs), max(r[1]["examples_per_s"] for r in runs)],
      "rounds_per_s": med("rounds_per_s", 1),
      "first_round_s": med("first_round_s", 1),
      "ratio_to_centralized": statistics.median(ratios),
      "repeats": repeats,
      "resolved_schedule": runs[0][1]["resolved_schedule"],
      "centralized_loop": runs[0][0]["loop"],
  }


def workload_p(args) -> list[dict]:
  """Each of ``--p_models`` (library CNN, the same CNN as plain flax.linen with and without the CPU fast-path
  rewrite), interleaved within every repeat so that they share the machine's load; ``vs_library`` is the
  median over repeats of each repeat's federated examples/s over the library CNN's."""
  rows = []
  names = args.p_models.split(",")
  for shape in args.shapes.split(","):
    c, e = (int(v) for v in shape.split("x"))
    data = make_data(c, e)
    for sched in args.schedules.split(","):
      runs = {name: [] for name in names}
      for _ in range(args.repeats):
        for name in names:
          model_fn, fast_path = P_MODELS[name]
          runs[name].append(measure(model_fn, data, sched, args.rounds, 32, 0.01, fast_path))
      for name in names:
        r = summarize(runs[name])
        if "library" in runs:
          r["vs_library"] = statistics.median(a[1]["examples_per_s"] / b[1]["examples_per_s"]
                                              for a, b in zip(runs[name], runs["library"]))
        mem, src = peak_memory_mb()
        rows.append({"workload": "P", "model": name, "shape": shape, "schedule": sched, **r, "peak_mem_mb": mem,
                     "mem_source": src})
        print(f"P {name} {shape} {sched}: {r['examples_per_s']:.0f} ex/s ({r['ratio_to_centralized']:.2f}x "
              f"centralized, {r.get('vs_library', float('nan')):.2f}x library CNN)", flush=True)
  return rows


def workload_resnet18(args) -> list[dict]:
  """ResNet18 (CIFAR stem, BatchNorm), ``--r18_clients`` clients x ``--r_examples``, paired with centralized
  training of the same model; with and without the CPU fast path (``--r18_fast_path``)."""
  rows = []
  data = make_data(args.r18_clients, args.r_examples)
  for fp in (v == "on" for v in args.r18_fast_path.split(",")):
    r = paired(resnet18_model, data, args.schedules.split(",")[0], args.repeats, args.rounds, args.batch, 0.01, fp)
    mem, src = peak_memory_mb()
    rows.append({"workload": "resnet18", "model": "resnet18" + ("" if fp else "-xla"),
                 "shape": f"{args.r18_clients}x{args.r_examples}", "schedule": args.schedules, **r,
                 "peak_mem_mb": mem, "mem_source": src})
    print(f"ResNet18 fast_path={fp}: {r['examples_per_s']:.1f} ex/s ({r['ratio_to_centralized']:.2f}x "
          f"centralized {r['centralized_examples_per_s']:.1f}), first round {r['first_round_s']:.1f} s", flush=True)
  return rows


def workload_torch(args) -> list[dict]:
  """ResNet18 (CIFAR stem), 10 clients x 64: a plain PyTorch CPU loop against JAX centralized and federated
  training of the same model, each in a fresh process, interleaved over ``--repeats``: steady examples/s and the
  time from process start to the end of the first round (see ``bench_torch``)."""
  import bench_torch

  if args.torch_python and not os.path.exists(args.torch_python):
    raise SystemExit(f"--torch_python {args.torch_python} does not exist")
  return bench_torch.run_all(args.repeats, args.rounds, args.batch, args.torch_python)


def workload_r(args) -> list[dict]:
  rows = []
  peak = peak_tflops(args.peak_tflops)
  dtype = DTYPES[args.dtype]
  for size in (int(s) for s in args.image_sizes.split(",")):
    flops = step_flops(resnet50_model(size, dtype), args.batch, 0.01)
    for clients in (int(c) for c in args.r_clients.split(",")):
      data = make_data(clients, args.r_examples)
      r = paired(lambda size=size: resnet50_model(size, dtype), data, args.schedules.split(",")[0], args.repeats,
                 args.rounds, args.batch, 0.01)
      mem, src = peak_memory_mb()
      per_ex = flops / args.batch if flops else None
      mfu = per_ex * r["examples_per_s"] / (peak * 1e12) if per_ex and peak else None
      rows.append({"workload": "R", "shape": f"{clients}x{args.r_examples}@{size}", "schedule": args.schedules,
                   "dtype": args.dtype,
                   **r, "gflops_per_example": per_ex / 1e9 if per_ex else None, "mfu": mfu,
                   "peak_tflops": peak, "peak_mem_mb": mem, "mem_source": src})
      print(f"R {rows[-1]['shape']}: {r['examples_per_s']:.1f} ex/s ({r['ratio_to_centralized']:.2f}x), "
            f"MFU {mfu if mfu is None else f'{mfu:.3f}'}", flush=True)
  return rows


def _scratch_dir(args) -> str:
  import tempfile

  d = args.scratch or os.path.join(tempfile.gettempdir(), f"fedjax_tl_bench_{os.getpid()}")
  os.makedirs(d, exist_ok=True)
  if not args.scratch:
    args.remove_scratch = d
  return d


def scale_one(args) -> dict:
  """One population in this process: cohort rounds with varying client sizes, retraces counted.

  ``--data host`` keeps the examples in an np.memmap file (written in chunks, never whole in RAM) and moves only
  the cohort's to the device; ``--personal`` gives every client its own head (``local_params="^head/"``) kept
  in ``--client_store`` (device, host RAM, or disk: np.memmap files)."""
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, args.max_examples + 1, args.population)
  n = int(sizes.sum())
  parts = np.split(np.arange(n), np.cumsum(sizes)[:-1])
  y = rng.integers(0, 10, n).astype(np.int32)
  t0 = time.perf_counter()
  if args.data == "host":
    # written through a file (not mapped pages, which would count in this process's RSS), then mapped read-only
    path = os.path.join(_scratch_dir(args), "x.npy")
    with open(path, "wb") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, 32, 32, 3)})
      for start in range(0, n, 65536):
        f.write(rng.integers(0, 256, (min(65536, n - start), 32, 32, 3), dtype=np.uint8).tobytes())
    x = np.load(path, mmap_mode="r")
    data = HostFederatedData.from_partition(Dataset(x, y, 10), parts)
  else:
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    data = FederatedData.from_partition(Dataset(x, y, 10), parts)
  del x
  build_s = time.perf_counter() - t0
  model = cnn_model()
  params, state = model.init(jax.random.PRNGKey(0))
  algo = FedAvg(LocalTraining(model, optax.sgd(0.01), args.scale_batch, epochs=1), schedule=args.scale_schedule,
                local_params="^head/" if args.personal else None)
  where = args.client_store
  if where == "disk":
    where = "disk:" + os.path.join(_scratch_dir(args), "rows")
  t0 = time.perf_counter()
  s = algo.init(params, state, num_clients=args.population, client_store=where)
  init_s = time.perf_counter() - t0
  row_bytes = 0
  if s.clients is not None:
    row_bytes = sum(a.nbytes for a in jax.tree.leaves(params["head"]))
  rss_before = _proc_status_mb("VmRSS")
  reset = _reset_peak_rss()  # from here on, peak RSS (peak_mem_mb below) covers the rounds, not data building
  walls = []
  for r in range(args.rounds + 1):
    ids = np.sort(np.random.default_rng(r).choice(args.population, args.cohort, replace=False))
    t0 = time.perf_counter()
    s, m = algo.apply(s, data, ids, jax.random.PRNGKey(r))
    jax.block_until_ready(s.params)
    walls.append(time.perf_counter() - t0)
    if r == 0:
      traces = algo.runner(data.pad_size).trace_count
  mem, src = peak_memory_mb()
  return {"workload": "scale", "population": args.population, "cohort": args.cohort, "examples": n,
          "data": args.data, "client_store": args.client_store if args.personal else "-",
          "state_bytes_per_client": row_bytes, "state_mb_population": row_bytes * args.population / 2**20,
          "store_init_s": init_s,
          "schedule": str(algo.runner(data.pad_size).schedule), "first_round_s": walls[0],
          "round_s": statistics.median(walls[1:]),
          "examples_per_s": float(m["num_examples"]) / statistics.median(walls[1:]),
          "retraces_after_first_round": algo.runner(data.pad_size).trace_count - traces,
          "data_mb": (data.x.nbytes + data.y.nbytes) / 2**20, "build_s": build_s, "peak_mem_mb": mem,
          "mem_source": src, "rss_before_rounds_mb": rss_before,
          # the rounds' own peak above the RSS they started from (data, model, runtime already resident)
          "rounds_extra_peak_mb": (_proc_status_mb("VmHWM") - rss_before) if reset and rss_before else None}


def workload_scale(args) -> list[dict]:
  rows = []
  for pop in (int(p) for p in args.populations.split(",")):
    cmd = [sys.executable, os.path.abspath(__file__), "--workload", "scale-one", "--population", str(pop),
           "--cohort", str(args.cohort), "--rounds", str(args.rounds), "--max_examples", str(args.max_examples),
           "--scale_batch", str(args.scale_batch), "--scale_schedule", args.scale_schedule,
           "--data", args.data, "--client_store", args.client_store] + (["--personal"] if args.personal else []) + (
           ["--scratch", args.scratch] if args.scratch else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"scale population {pop}: {rows[-1]['round_s']:.2f} s/round, peak {rows[-1]['peak_mem_mb']:.0f} MB, "
          f"retraces {rows[-1]['retraces_after_first_round']}", flush=True)
  return rows


def workload_hostdata(args) -> list[dict]:
  """Workload-P-sized data (``--shapes``), every client each round: the examples on device (FederatedData)
  vs on the host (HostFederatedData: each round gathers and moves the cohort's examples), interleaved within
  every repeat; ``vs_device`` is the median of each repeat's host examples/s over the device's."""
  rows = []
  for shape in args.shapes.split(","):
    c, e = (int(v) for v in shape.split("x"))
    dev = make_data(c, e)
    host = HostFederatedData(np.asarray(dev.x), np.asarray(dev.y), dev.client_indices, dev.num_classes)
    sched = args.schedules.split(",")[0]
    runs = {"device": [], "host": []}
    for _ in range(args.repeats):
      for name, data in (("device", dev), ("host", host)):
        runs[name].append(bench_federated(sched, data, args.rounds, 32, 0.01, model=cnn_model()))
    for name in runs:
      eps = [r["examples_per_s"] for r in runs[name]]
      rows.append({"workload": "hostdata", "data": name, "shape": shape, "schedule": sched,
                   "examples_per_s": statistics.median(eps), "examples_per_s_min_max": [min(eps), max(eps)],
                   "vs_device": statistics.median(h["examples_per_s"] / d["examples_per_s"]
                                                  for h, d in zip(runs[name], runs["device"])),
                   "first_round_s": statistics.median(r["first_round_s"] for r in runs[name]),
                   "repeats": args.repeats})
      print(f"hostdata {shape} {name}: {rows[-1]['examples_per_s']:.0f} ex/s ({rows[-1]['vs_device']:.2f}x "
            "device)", flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", default="P", choices=["P", "R", "resnet18", "torch", "scale", "scale-one",
                                                         "hostdata"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=2, help="timed rounds (epochs for centralized) after warm-up")
  p.add_argument("--schedules", default="auto", help="comma-separated schedules (R uses the first)")
  p.add_argument("--shapes", default="10x500,100x64", help="P: CLIENTSxEXAMPLES")
  p.add_argument("--p_models", default="library,plain,plain-xla",
                 help="P: library (models.cnn CNN), plain (nn.Conv/nn.max_pool CNN, CPU fast path), plain-xla "
                 "(the same without the fast path)")
  p.add_argument("--r18_clients", type=int, default=10, help="resnet18: clients per round")
  p.add_argument("--r18_fast_path", default="on,off", help="resnet18: on, off or on,off")
  p.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON"),
                 help="torch: an interpreter with PyTorch installed (PyTorch is only a benchmark reference; "
                 "default $TORCH_PYTHON; without it the torch rows are skipped)")
  p.add_argument("--image_sizes", default="32,224", help="R: model input sizes (data is 32x32, resized on device)")
  p.add_argument("--r_clients", default="10,100", help="R: clients per round")
  p.add_argument("--r_examples", type=int, default=64, help="R: examples per client")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                 help="R: ResNet computation dtype (bfloat16 = mixed precision, params float32)")
  p.add_argument("--peak_tflops", type=float, default=None, help="R: peak for MFU (default: by device kind)")
  p.add_argument("--populations", default="10000,100000")
  p.add_argument("--population", type=int, default=100000)
  p.add_argument("--cohort", type=int, default=1000)
  p.add_argument("--max_examples", type=int, default=8, help="scale: client sizes uniform in 1..max")
  p.add_argument("--scale_batch", type=int, default=8)
  p.add_argument("--scale_schedule", default="auto")
  p.add_argument("--data", default="device", choices=["device", "host"],
                 help="scale: examples on device, or on the host (an np.memmap file in --scratch)")
  p.add_argument("--personal", action="store_true", help="scale: every client keeps its own head (local_params)")
  p.add_argument("--client_store", default="device", choices=["device", "host", "disk"],
                 help="scale --personal: where the heads live (disk: np.memmap files in --scratch)")
  p.add_argument("--scratch", default=None, help="scale: directory for memmap files (default: a temp dir)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.workload == "scale-one":
    try:
      print(json.dumps(scale_one(args)))
    finally:
      if getattr(args, "remove_scratch", None):
        import shutil

        shutil.rmtree(args.remove_scratch, ignore_errors=True)
    return
  rows = {"P": workload_p, "R": workload_r, "resnet18": workload_resnet18, "torch": workload_torch,
          "scale": workload_scale, "hostdata": workload_hostdata}[args.workload](args)
  meta = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "devices": len(jax.devices()), "jax": jax.__version__, "machine": platform.machine(),
          "cpus": os.cpu_count(), "argv": sys.argv[1:]}
  print(f"\n{meta}")
  if args.workload == "torch":
    cols = ["mode", "shape", "batch", "schedule", "examples_per_s", "x_torch_examples_per_s", "first_step_s",
            "x_torch_first_step_s", "first_round_s", "x_torch_first_round_s", "startup_import_s", "params",
            "threads", "version"]
  elif args.workload == "scale":
    cols = ["population", "cohort", "data", "client_store", "state_mb_population", "store_init_s", "schedule",
            "first_round_s", "round_s", "examples_per_s", "retraces_after_first_round", "data_mb", "peak_mem_mb",
            "rss_before_rounds_mb", "rounds_extra_peak_mb"]
  elif args.workload == "hostdata":
    cols = ["data", "shape", "schedule", "examples_per_s", "vs_device", "first_round_s", "repeats"]
  else:
    cols = ["workload", "model", "shape", "schedule", "resolved_schedule", "examples_per_s", "vs_library",
            "centralized_examples_per_s", "centralized_loop", "ratio_to_centralized",
            "rounds_per_s", "first_round_s", "peak_mem_mb"] + (["gflops_per_example", "mfu"] if args.workload == "R"
                                                               else [])
  print(format_table(cols, [[r.get(c) for c in cols] for r in rows]))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({**meta, "rows": rows}, f, indent=1)
    print(f"written to {args.out}")


if __name__ == "__main__":
  main()
