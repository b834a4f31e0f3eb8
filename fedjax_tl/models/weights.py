"""ImageNet weights for the Flax ResNet: download with checksum, cache, read, convert.

Sources:
  * ``keras_resnet50_notop``: Keras Applications' ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``, the
    file ``keras.applications.ResNet50(weights='imagenet', include_top=False)`` loads (legacy Keras h5 layout:
    root attribute ``layer_names``, one group per layer with attribute ``weight_names``). Keras 'caffe'
    preprocessing (:func:`fedjax_tl.models.resnet.caffe_preprocess`).
  * ``timm_resnet50_a1``: timm's ``resnet50.a1_in1k`` (Wightman et al. 2021, "ResNet strikes back"; 80.4% top-1
    vs ~75% for the Keras file) as safetensors, in the torchvision key layout (``conv1.weight``,
    ``layer1.0.downsample.0.weight``, ...) that torchvision's own ResNet50 checkpoints share. Architecture
    v1.5 (:data:`fedjax_tl.models.resnet.ResNet50Torch`), mean/std preprocessing
    (:func:`fedjax_tl.models.resnet.torch_preprocess`). No checksum is published with it: pin one with
    ``FEDJAX_TL_TIMM_RESNET50_SHA256``, otherwise the SHA-256 of the first download is recorded and checked
    from then on.

Where the file comes from, in order: an explicit ``path``; the environment variable
``FEDJAX_TL_RESNET50_WEIGHTS``; the cache directory (``FEDJAX_TL_CACHE`` or ``~/.cache/fedjax_tl``); a download.
A downloaded or cached file is verified before use: against the SHA-256 in ``FEDJAX_TL_RESNET50_SHA256`` when
set, else against the MD5 that Keras publishes for the file (``WEIGHTS_HASHES`` in keras.applications.resnet),
after which its SHA-256 is recorded beside it (``<file>.sha256``) and checked on every later load. A file that
fails a check, cannot be parsed or lacks a layer raises :class:`WeightFileError`; nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.request

import numpy as np

from fedjax_tl.types import ModelState, Params

__all__ = ["WeightFileError", "KERAS_RESNET50_NOTOP", "TIMM_RESNET50_A1", "fetch", "read_keras_h5",
           "keras_to_flax", "load_keras_resnet50", "read_safetensors", "torch_to_flax", "load_torch_resnet50"]


class WeightFileError(RuntimeError):
  """A weights file is missing, corrupt, truncated or does not hold the expected layers."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
  name: str
  url: str
  filename: str
  md5: str | None = None
  sha256: str | None = None
  size: int | None = None
  path_env: str = ""
  sha256_env: str = ""


KERAS_RESNET50_NOTOP = WeightSource(
    name="keras_resnet50_notop",
    url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    filename="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    md5="4d473c1dd8becc155b73f8504c6f6626",
    size=94765736,
    path_env="FEDJAX_TL_RESNET50_WEIGHTS",
    sha256_env="FEDJAX_TL_RESNET50_SHA256",
)


TIMM_RESNET50_A1 = WeightSource(
    name="timm_resnet50_a1",
    url="https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
    filename="timm_resnet50_a1_in1k.safetensors",
    path_env="FEDJAX_TL_TIMM_RESNET50_WEIGHTS",
    sha256_env="FEDJAX_TL_TIMM_RESNET50_SHA256",
)


def cache_dir() -> str:
  return os.environ.get("FEDJAX_TL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fedjax_tl"))


def _digest(path: str, algo: str) -> str:
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def verify(path: str, source: WeightSource) -> None:
  """Checks size and checksum of ``path`` (see the module docstring for which checksum)."""
  if source.size is not None and os.path.getsize(path) != source.size:
    raise WeightFileError(f"{path} has {os.path.getsize(path)} bytes, expected {source.size} for "
                          f"{source.filename}: the file is truncated or not the right one. Delete it and retry.")
  sha_expected = os.environ.get(source.sha256_env) if source.sha256_env else None
  sha_expected = sha_expected or source.sha256
  sidecar = path + ".sha256"
  if not sha_expected and os.path.exists(sidecar):
    with open(sidecar) as f:
      sha_expected = f.read().strip()
  if sha_expected:
    got = _digest(path, "sha256")
    if got != sha_expected:
      raise WeightFileError(f"SHA-256 of {path} is {got}, expected {sha_expected}: corrupt or tampered file. "
                            "Delete it and download again.")
    return
  if source.md5:
    got = _digest(path, "md5")
    if got != source.md5:
      raise WeightFileError(f"MD5 of {path} is {got}, expected {source.md5} (published by Keras): corrupt or "
                            "tampered file. Delete it and download again.")
  # Keras's MD5 matched, or nothing is published: record the SHA-256 and check it on every later load.
  with open(sidecar, "w") as f:
    f.write(_digest(path, "sha256") + "\n")


def fetch(source: WeightSource, path: str | None = None, download: bool = True) -> str:
  """Local path of ``source``'s weights file, downloading and verifying it on first use."""
  path = path or (os.environ.get(source.path_env) if source.path_env else None)
  if path:
    if not os.path.isfile(path):
      raise WeightFileError(f"Weights file {path!r} does not exist (given by argument or ${source.path_env}).")
    return path
  target = os.path.join(cache_dir(), source.filename)
  if os.path.isfile(target):
    verify(target, source)
    return target
  if not download:
    raise WeightFileError(f"{source.filename} is not in the cache ({target}) and downloads are disabled.")
  os.makedirs(cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source.url, timeout=60) as resp:
      shutil.copyfileobj(resp, out)
    verify(tmp, source)
    os.replace(tmp, target)
    if os.path.exists(tmp + ".sha256"):
      os.replace(tmp + ".sha256", target + ".sha256")
  except OSError as e:
    raise WeightFileError(
        f"Could not download {source.url} ({e}). Without network, download the file elsewhere and pass its "
        f"path (--weights_path=... or ${source.path_env}=...), or place it at {target}.") from e
  finally:
    for p in (tmp, tmp + ".sha256"):
      if os.path.exists(p):
        os.remove(p)
  return target


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{layer name: {variable kind: array}} from a legacy Keras h5 weights file (kind = 'kernel', 'bias',
  'gamma', 'beta', 'moving_mean', 'moving_variance')."""
  import h5py

  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise WeightFileError(f"Cannot read {path} as HDF5 ({e}): the file is corrupt or truncated.") from e
  out = {}
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise WeightFileError(f"{path} is not a legacy Keras weights file (no 'layer_names' attribute).")
    try:
      for raw in root.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        g = root[name]
        vars_ = {}
        for wraw in g.attrs.get("weight_names", []):
          wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
          kind = wname.split("/")[-1].split(":")[0]
          vars_[kind] = np.asarray(g[wname])
        if vars_:
          out[name] = vars_
    except (KeyError, OSError, ValueError) as e:
      raise WeightFileError(f"{path} is damaged: {e}") from e
  return out


def keras_to_flax(layers: dict[str, dict[str, np.ndarray]]) -> tuple[Params, ModelState]:
  """Keras layer weights -> (params, {'batch_stats': ...}) for :class:`fedjax_tl.models.resnet.ResNet`.

  Our modules carry the Keras layer names; a BatchNorm ``X_bn`` lives at ``X_bn/bn`` (the norm wrapper).
  """
  params: dict = {}
  stats: dict = {}
  for name, v in layers.items():
    if "kernel" in v:  # Conv2D (HWIO in both) or Dense
      params[name] = {"kernel": v["kernel"], **({"bias": v["bias"]} if "bias" in v else {})}
    elif "gamma" in v:
      params[name] = {"bn": {"scale": v["gamma"], "bias": v["beta"]}}
      stats[name] = {"bn": {"mean": v["moving_mean"], "var": v["moving_variance"]}}
    else:
      raise WeightFileError(f"Layer {name} has unexpected variables {sorted(v)}.")
  return params, {"batch_stats": stats}


def load_keras_resnet50(path: str | None = None, download: bool = True) -> tuple[Params, ModelState]:
  """ImageNet ResNet50 (no top) as (params, model_state) for ``ResNet50()``."""
  return keras_to_flax(read_keras_h5(fetch(KERAS_RESNET50_NOTOP, path, download)))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (bf16/fp16 upcast to float32)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise WeightFileError(f"Cannot read {path} as safetensors ({e}): corrupt or truncated file.") from e
  return {k: v.astype(np.float32) if v.dtype != np.float32 and v.dtype.kind == "f" else v
          for k, v in tensors.items()}


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> tuple[Params, ModelState]:
  """torchvision/timm ResNet keys -> (params, {'batch_stats': ...}) for ``ResNet50Torch()``.

  ``conv1``/``bn1`` -> ``conv1_conv``/``conv1_bn``; ``layerL.J.convK``/``bnK`` -> ``conv{L+1}_block{J+1}_K_*``;
  ``downsample.0``/``.1`` -> ``..._0_conv``/``_0_bn``. Conv kernels OIHW -> HWIO. The ImageNet classifier
  (``fc.*``) and ``num_batches_tracked`` are dropped; any other key is an error.
  """
  import re

  params: dict = {}
  stats: dict = {}
  unknown = []
  for key, value in state_dict.items():
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
      layer, kind = ("conv1_conv" if m.group(1) == "conv1" else "conv1_bn"), m.group(2)
    else:
      m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv(\d)|bn(\d)|downsample\.(\d))\.(\w+)", key)
      if not m:
        unknown.append(key)
        continue
      stage, block = int(m.group(1)) + 1, int(m.group(2)) + 1
      prefix = f"conv{stage}_block{block}"
      if m.group(4):
        layer = f"{prefix}_{m.group(4)}_conv"
      elif m.group(5):
        layer = f"{prefix}_{m.group(5)}_bn"
      else:
        layer = f"{prefix}_0_{'conv' if m.group(6) == '0' else 'bn'}"
      kind = m.group(7)
    if layer.endswith("_conv"):
      if kind != "weight":
        unknown.append(key)
        continue
      params[layer] = {"kernel": np.transpose(value, (2, 3, 1, 0))}
    else:
      target = {"weight": ("p", "scale"), "bias": ("p", "bias"), "running_mean": ("s", "mean"),
                "running_var": ("s", "var")}.get(kind)
      if target is None:
        unknown.append(key)
        continue
      tree = params if target[0] == "p" else stats
      tree.setdefault(layer, {"bn": {}})["bn"][target[1]] = value
  if unknown:
    raise WeightFileError(f"Unexpected keys for a torchvision-layout ResNet: {unknown[:10]}")
  return params, {"batch_stats": stats}


def load_torch_resnet50(path: str | None = None, download: bool = True) -> tuple[Params, ModelState]:
  """timm/torchvision ResNet50 (v1.5) weights as (params, model_state) for ``ResNet50Torch()``."""
  return torch_to_flax(read_safetensors(fetch(TIMM_RESNET50_A1, path, download)))
