"""Smaller models for constrained clients: magnitude pruning and int8 quantization, after and during
federated training (see docs/compress.md)."""

from fedjax_tl.compress.federated import FederatedPruning, PruningServerState, sparse_downlink, sparse_uplink
from fedjax_tl.compress.pruning import (
  apply_mask,
  is_kernel,
  keep_pruned,
  magnitude_mask,
  masked,
  polynomial_sparsity,
  sparsity,
)
from fedjax_tl.compress.quantize import (
  QuantizedModel,
  load_quantized,
  ptq,
  qat,
  quantizable,
  quantized_bytes,
  save_quantized,
)
from fedjax_tl.compress.report import latency_ms, size_report, sparse_bits

__all__ = [
  # pruning
  "apply_mask", "is_kernel", "keep_pruned", "magnitude_mask", "masked", "polynomial_sparsity", "sparsity",
  # int8 quantization (qwix)
  "QuantizedModel", "load_quantized", "ptq", "qat", "quantizable", "quantized_bytes", "save_quantized",
  # during federated training
  "FederatedPruning", "PruningServerState", "sparse_downlink", "sparse_uplink",
  # size and latency
  "latency_ms", "size_report", "sparse_bits",
]
