"""The experiments' compression flags (``--quantize``, ``--prune``, ``--prune_schedule``, ``--prune_scope``), the
FedAvg pieces they ask for, and the per-run report (accuracy, size, latency of what a client would deploy)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.compress import quantize as quant
from fedjax_tl.compress.federated import FederatedPruning, sparse_uplink
from fedjax_tl.compress.pruning import apply_mask, magnitude_mask
from fedjax_tl.compress.report import latency_ms, size_report
from fedjax_tl.models.base import Model
from fedjax_tl.transforms.base import chain
from fedjax_tl.tree import tree_bits

__all__ = ["CompressFlags", "QUANTIZE", "compress_setup", "compress_report", "accuracy", "parse_prune_schedule"]

QUANTIZE = ("none", "int8", "int8_weights", "int8_qat")


@dataclasses.dataclass(frozen=True)
class CompressFlags:
  """Compression fields shared by the experiments' configs (read by :func:`compress_setup`)."""

  # none | int8 (dynamic-range PTQ of the final model) | int8_weights (weight-only PTQ) | int8_qat (clients train
  # the fake-quantized model, QAT; the final model is then int8 PTQ'd)
  quantize: str = "none"
  prune: float = 0.0  # final sparsity of the kernels (0 = no pruning)
  # poly[:BEGIN:END[:FREQ]] (Zhu-Gupta during training, rounds; default 0 : rounds//2 : 1) | start (prune the
  # initial model, train with a fixed mask) | final (prune the trained model once, no fine-tuning)
  prune_schedule: str = "poly"
  prune_scope: str = "global"  # global | layer


def parse_prune_schedule(spec: str, sparsity: float, rounds: int, scope: str = "global") -> FederatedPruning | None:
  """The :class:`FederatedPruning` for ``--prune_schedule`` (None for "final", which prunes after training)."""
  name, *args = spec.strip().split(":")
  if name == "final":
    return None
  if name == "start":
    return FederatedPruning(sparsity, end_round=1, initial_sparsity=sparsity, scope=scope)
  if name == "poly" and len(args) in (0, 2, 3):
    begin, end = (0, max(rounds // 2, 1)) if not args else (int(args[0]), int(args[1]))
    freq = int(args[2]) if len(args) == 3 else 1
    return FederatedPruning(sparsity, end_round=end, begin_round=begin, frequency=freq, scope=scope)
  raise ValueError(f"--prune_schedule={spec!r}: use poly, poly:BEGIN:END, poly:BEGIN:END:FREQ (rounds), start or "
                   "final.")


def compress_setup(cfg, fedavg_kwargs: dict, log=print) -> tuple[dict, FederatedPruning | None]:
  """FedAvg keyword arguments with the compression ``cfg`` asks for (its :class:`CompressFlags` fields and
  ``rounds``): a QAT client model for "int8_qat"; for pruning during training the masked client optimizer,
  the pruning server optimizer and the sparse up/downlink accounting. ``fedavg_kwargs`` must hold ``local``
  and ``server_optimizer``. Returns (kwargs, the FederatedPruning or None); prune the initial params with its
  ``prune``."""
  if cfg.quantize not in QUANTIZE:
    raise ValueError(f"--quantize must be one of {QUANTIZE}, got {cfg.quantize!r}.")
  if not 0.0 <= cfg.prune < 1.0:
    raise ValueError(f"--prune is the final sparsity, in [0, 1); got {cfg.prune}.")
  if cfg.prune_scope not in ("global", "layer"):
    raise ValueError(f"--prune_scope must be 'global' or 'layer', got {cfg.prune_scope!r}.")
  kw = dict(fedavg_kwargs)
  if cfg.quantize == "int8_qat":
    kw["local"] = dataclasses.replace(kw["local"], model=quant.qat(kw["local"].model))
    log("quantization-aware training: clients train the int8 fake-quantized model (qwix QT); the server keeps "
        "float32 params")
  fp = parse_prune_schedule(cfg.prune_schedule, cfg.prune, cfg.rounds, cfg.prune_scope) if cfg.prune > 0 else None
  if fp is not None:
    if kw.get("downlink") is not None or getattr(cfg, "compress", "none") != "none":
      raise ValueError("--prune counts the up- and downlink as sparse and cannot be stacked on --compress or "
                       "--downlink; use one of them (or --prune_schedule=final, which prunes after training).")
    if getattr(cfg, "secure_agg", False):
      raise ValueError("--prune with --secure_agg: masked sums are dense field vectors; use one of them.")
    pk = fp.fedavg_kwargs(kw["local"], kw["server_optimizer"])
    clip = kw.get("client_transform")
    pk["client_transform"] = sparse_uplink(fp.prunable) if clip is None else chain(clip, pk["client_transform"])
    kw.update(pk)
    log(f"pruning during training: {cfg.prune:.0%} of the kernels ({cfg.prune_scope}), schedule "
        f"{cfg.prune_schedule} (rounds {fp.begin_round}..{fp.end_round}); masked weights are neither trained "
        "nor sent")
  return kw, fp


def accuracy(apply_fn, x, y, batch_size: int = 256) -> float:
  """Accuracy of ``apply_fn(x_batch) -> logits`` on (x, y), in fixed-size batches (the last one padded)."""
  n, b = len(y), min(batch_size, len(y))
  correct = 0
  for start in range(0, n, b):
    idx = np.minimum(np.arange(start, start + b), n - 1)
    pred = np.asarray(jnp.argmax(apply_fn(jnp.asarray(x[idx])), -1))
    correct += int((pred == np.asarray(y)[idx])[: n - start].sum())
  return correct / n


def compress_report(cfg, model: Model, params, state, x, y, runs: int = 20) -> list[dict]:
  """Rows of what a client would deploy after this run: the float32 model (pruned once now for
  ``--prune_schedule=final``) and, with ``--quantize``, its int8 version: test accuracy, size in bytes (float32
  or sparse COO, whichever is smaller, or int8; model state included; formats in
  :mod:`fedjax_tl.compress.report`) and the median latency of a jitted forward pass on ``min(256, len(y))``
  test examples on this backend (pruned models run dense: XLA has no sparse convolution)."""
  rows = []
  if cfg.prune > 0 and cfg.prune_schedule.strip() == "final":
    params = apply_mask(params, magnitude_mask(params, cfg.prune, scope=cfg.prune_scope))
  batch = jnp.asarray(x[: min(256, len(y))])
  fwd = jax.jit(lambda p, s, xb: model.apply(p, s, xb, train=False)[0])
  sizes = size_report(params)
  state_bytes = tree_bits(state) // 8  # e.g. BatchNorm statistics, float32 in every format
  best = min(sizes["float32_bytes"], sizes["sparse_bytes"]) + state_bytes
  rows.append({"model": "float32" + (f" pruned {sizes['sparsity']:.0%}" if cfg.prune > 0 else ""),
               "test_accuracy": accuracy(lambda xb: fwd(params, state, xb), x, y),
               "bytes": best,
               "format": "sparse COO" if best < sizes["float32_bytes"] + state_bytes else "dense float32",
               "sparsity": sizes["sparsity"], "parameters": sizes["parameters"],
               "latency_ms": latency_ms(lambda xb: fwd(params, state, xb), batch, runs=runs)})
  if cfg.quantize != "none":
    mode = "weight_only" if cfg.quantize == "int8_weights" else "dynamic"
    q = quant.ptq(model, params, state, mode)
    dense, sparse = quant.quantized_bytes(q), sizes["sparse_int8_bytes"] + state_bytes
    rows.append({"model": f"int8 {mode}" + (" (QAT)" if cfg.quantize == "int8_qat" else ""),
                 "test_accuracy": accuracy(q.apply, x, y), "bytes": min(dense, sparse),
                 "format": "int8 sparse COO" if sparse < dense else "int8 + f32 scales",
                 "sparsity": sizes["sparsity"], "parameters": sizes["parameters"],
                 "latency_ms": latency_ms(q.apply, batch, runs=runs)})
  return rows
