"""int8 PTQ (qwix) of the library's CNN and ResNetTiny: logits close to float, a real int8 artifact ~1/4 size."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from fedjax_tl.compress import quantize as Q  # noqa: E402
from fedjax_tl.models.base import Model  # noqa: E402
from fedjax_tl.models.cnn import CNN  # noqa: E402
from fedjax_tl.models.resnet import ClassifierHead, ResNetTiny  # noqa: E402

# Stated tolerance: max |logit error| relative to max |logit| (per-channel int8 weights: ~0.4% per weight;
# dynamic-range also quantizes every activation per tensor).
TOL = {"weight_only": 0.025, "dynamic": 0.05}
MODELS = {"cnn": lambda: Model(CNN(num_classes=5, features=(16, 32), hidden=64), (8, 8, 1)),
          "resnet_tiny": lambda: Model(ClassifierHead(ResNetTiny(), num_classes=5), (32, 32, 3))}


def _setup(name):
  model = MODELS[name]()
  params, state = model.init(jax.random.PRNGKey(0))
  x = jax.random.randint(jax.random.PRNGKey(1), (16, *model.sample_shape), 0, 256).astype(jnp.uint8)
  return model, params, state, x


@pytest.mark.parametrize("mode", Q.MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_logits_close_to_float(name, mode):
  model, params, state, x = _setup(name)
  ref = model.apply(params, state, x, train=False)[0]
  q = Q.ptq(model, params, state, mode)
  out = q.apply(x)
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert err < TOL[mode]
  assert err > 0  # it really is quantized
  kernels = [a for a in jax.tree.leaves(q.params) if a.dtype == jnp.int8]
  assert len(kernels) == sum(1 for k in jax.tree_util.tree_leaves_with_path(params) if k[0][-1].key == "kernel")


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_artifact_is_int8_and_about_a_quarter(name, tmp_path):
  model, params, state, x = _setup(name)
  q = Q.ptq(model, params, state, "dynamic")
  size = Q.save_quantized(str(tmp_path / "q.npz"), q)
  with open(tmp_path / "f.npz", "wb") as f:
    np.savez(f, *[np.asarray(a) for a in jax.tree.leaves((params, state))])
  float_size = os.path.getsize(tmp_path / "f.npz")
  with np.load(tmp_path / "q.npz") as z:
    int8 = {k: v for k, v in z.items() if v.dtype == np.int8}
  kernel_sizes = sorted(a.size for p, a in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel")
  assert sorted(v.size for v in int8.values()) == kernel_sizes  # every kernel stored as int8
  # exact payload: int8 kernels + float32 per-channel scales + float32 rest
  n_kernel = sum(kernel_sizes)
  n_scales = sum(a.shape[-1] for p, a in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel")
  n_rest = sum(a.size for a in jax.tree.leaves((params, state))) - n_kernel
  assert Q.quantized_bytes(q) == n_kernel + 4 * (n_scales + n_rest)
  assert size / float_size < 0.36  # ~1/4 plus the float biases/normalisation and npz headers
  restored = Q.load_quantized(str(tmp_path / "q.npz"), Q.ptq(model, *model.init(jax.random.PRNGKey(7)), "dynamic"))
  np.testing.assert_array_equal(restored.apply(x), q.apply(x))


def test_errors_name_the_fix():
  model, params, state, _ = _setup("cnn")
  with pytest.raises(ValueError, match="mode must be"):
    Q.ptq(model, params, state, "int4")
  with pytest.raises(ValueError, match="None for both"):
    Q.qat(model, weight_qtype=jnp.int8, act_qtype=None)
