"""int8 quantization of the library's Flax Linen models with qwix: after training (PTQ) and during it (QAT).

Modes (symmetric absmax int8, one scale per output channel of every kernel):
  "dynamic"      dynamic-range PTQ: int8 weights, activations quantized to int8 on the fly per call, int8 x int8
                 products (qwix ``PtqProvider``, ``weight_qtype = act_qtype = int8``).
  "weight_only"  int8 weights, float computation. qwix expresses this for matrix products (``dot_general``)
                 but not for convolutions: its PTQ ``conv_general_dilated`` requires ``act_qtype ==
                 weight_qtype``. Convolution kernels are therefore stored as qwix ``QArray`` s (``qwix.quantize``)
                 and dequantized in the forward pass (``qwix.dequantize``), a few lines of our own.
Quantization-aware training (:func:`qat`): the model's forward pass fake-quantizes weights and activations to
int8 (qwix ``QtProvider``, straight-through gradients); the params stay float32, so the federated server keeps
and averages float params unchanged.

qwix intercepts ``lax.conv_general_dilated`` and ``lax.dot_general`` on module params. The library's CNN computes
its convolutions on CPU as im2col matrix products inside a ``custom_vjp`` (its kernel reshaped), where qwix would
not see a weight; :func:`quantizable` switches such models to XLA's convolution (same params, same function).
Biases, normalisation params and statistics stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.models.base import Model
from fedjax_tl.types import ModelState, Params

__all__ = ["MODES", "QuantizedModel", "quantizable", "ptq", "qat", "save_quantized", "load_quantized",
           "quantized_bytes"]

MODES = ("weight_only", "dynamic")


def _qwix():
  try:
    import qwix
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("int8 quantization needs qwix: pip install 'fedjax_tl[compress]' (or qwix>=0.1.8).") from e
  return qwix


def quantizable(model: Model) -> Model:
  """``model`` with every module that has a ``conv`` lowering choice ("auto"/"im2col") set to "xla", so that
  qwix sees its convolutions (at the top level and in a ``backbone``)."""
  def fix(m: nn.Module) -> nn.Module:
    changes = {}
    if getattr(m, "conv", None) in ("auto", "im2col"):
      changes["conv"] = "xla"
    if isinstance(getattr(m, "backbone", None), nn.Module):
      changes["backbone"] = fix(m.backbone)
    return m.clone(**changes) if changes else m

  return dataclasses.replace(model, module=fix(model.module))


def _is_q(x) -> bool:
  qwix = _qwix()
  from qwix._src.providers.ptq import WithAux

  return isinstance(x, (qwix.QArray, WithAux))


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A post-training-quantized model: ``params`` hold int8 ``QArray`` s (qwix) where kernels were.

  Attributes:
    model: the qwix-intercepted model (its ``apply`` takes the quantized params).
    params: quantized params (float leaves for biases/normalisation).
    state: model state (e.g. batch_stats), float32.
    mode: "weight_only" or "dynamic".
  """

  model: Model
  params: Params
  state: ModelState
  mode: str

  def apply(self, x: jax.Array) -> jax.Array:
    """Logits of the quantized model for a batch of stored examples (eval mode)."""
    return _apply(self.model, self.mode, self.params, self.state, x)


def _dequantize_own(params: Params) -> Params:
  """weight_only: the convolution kernels we quantized ourselves (bare QArrays) back to float."""
  qwix = _qwix()
  return jax.tree.map(lambda a: qwix.dequantize(a) if isinstance(a, qwix.QArray) else a, params,
                      is_leaf=lambda a: _is_q(a))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(model: Model, mode: str, params, state, x):
  if mode == "weight_only":
    params = _dequantize_own(params)
  return model.apply(params, state, x, train=False)[0]


def _rules(mode: str):
  qwix = _qwix()
  if mode == "dynamic":
    return [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
  if mode == "weight_only":
    return [qwix.QuantizationRule(module_path=".*", op_names=("dot_general", "einsum"), weight_qtype=jnp.int8)]
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def ptq(model: Model, params: Params, state: ModelState, mode: str = "dynamic") -> QuantizedModel:
  """Post-training int8 quantization of a trained ``model`` (see the module docstring for the modes)."""
  qwix = _qwix()
  rules = _rules(mode)
  model = quantizable(model)
  qmodel = dataclasses.replace(model, module=qwix.quantize_model(model.module, qwix.PtqProvider(rules)))
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0))[0])
  qparams = qwix.quantize_params(params, abstract)
  if mode == "weight_only":  # convolution kernels: qwix's PTQ conv needs activations quantized too
    def own(path, a):
      if isinstance(a, jax.Array) and path[-1].key == "kernel" and a.ndim >= 3:
        return qwix.quantize(a, jnp.int8, channelwise_axes=(a.ndim - 1,))
      return a

    qparams = jax.tree_util.tree_map_with_path(own, qparams, is_leaf=_is_q)
  return QuantizedModel(qmodel, qparams, state, mode)


def qat(model: Model, weight_qtype: Any = jnp.int8, act_qtype: Any = jnp.int8) -> Model:
  """``model`` whose forward pass fake-quantizes (qwix QT, straight-through estimator) kernels to
  ``weight_qtype`` and the activations entering every matrix product/convolution to ``act_qtype``. Params stay
  float (same tree as ``model``); ``weight_qtype=act_qtype=None`` quantizes nothing (the float model)."""
  qwix = _qwix()
  model = quantizable(model)
  if weight_qtype is None and act_qtype is None:
    rules = []
  elif weight_qtype is None or act_qtype is None:
    raise ValueError("qat() quantizes weights and activations together (qwix's convolutions need both); give "
                     "both qtypes, or None for both to switch it off.")
  else:
    rules = [qwix.QtRule(module_path=".*", weight_qtype=weight_qtype, act_qtype=act_qtype)]
  return dataclasses.replace(model, module=qwix.quantize_model(model.module, qwix.QtProvider(rules)))


def _flat(tree) -> dict[str, np.ndarray]:
  """'/'-joined path -> numpy array, QArrays split into ``.../qvalue`` and ``.../scale``."""
  qwix = _qwix()
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: isinstance(a, qwix.QArray))[0]
  for path, a in leaves:
    name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    if isinstance(a, qwix.QArray):
      if a.zero_point is not None:
        raise ValueError(f"{name}: asymmetric quantization (zero_point) is not supported by save_quantized.")
      out[name + "/qvalue"] = np.asarray(a.qvalue)
      out[name + "/scale"] = np.asarray(a.scale)
    else:
      out[name] = np.asarray(a)
  return out


def quantized_bytes(q: QuantizedModel) -> int:
  """Bytes of the arrays of the quantized params and state (int8 values, float32 scales and the rest)."""
  return sum(a.nbytes for a in _flat({"params": q.params, "state": q.state}).values())


def save_quantized(path: str, q: QuantizedModel) -> int:
  """Writes the int8 artifact as an uncompressed ``.npz`` (one array per int8 value / scale / float leaf) and
  returns its size in bytes."""
  arrays = _flat({"params": q.params, "state": q.state})
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return os.path.getsize(path)


def load_quantized(path: str, like: QuantizedModel) -> QuantizedModel:
  """The artifact at ``path`` rebuilt into the structure of ``like`` (e.g. ``ptq`` of a fresh model)."""
  qwix = _qwix()
  with np.load(path) as z:
    arrays = dict(z)
  tree = {"params": like.params, "state": like.state}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: isinstance(a, qwix.QArray))
  new = []
  for p, a in leaves:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
    if isinstance(a, qwix.QArray):
      new.append(a.replace(qvalue=jnp.asarray(arrays[name + "/qvalue"]), scale=jnp.asarray(arrays[name + "/scale"])))
    else:
      new.append(jnp.asarray(arrays[name]))
  out = jax.tree.unflatten(treedef, new)
  return dataclasses.replace(like, params=flax.core.unfreeze(out["params"]), state=out["state"])
