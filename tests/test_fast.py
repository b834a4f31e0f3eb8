"""The fast CPU rewrite (models/fast.py): same values and gradients as the un-rewritten program."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.models.base import Model
from fedjax_tl.models.fast import FastModel, fast_cpu, rewrite, rewrite_jaxpr_stats, unwrap
from fedjax_tl.models.resnet import ClassifierHead, ResNet, ResNetTiny


class PlainCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for f in (4, 8):
      x = nn.max_pool(nn.relu(nn.Conv(f, (3, 3))(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _close(a, b, rtol=1e-5, atol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _check_model(model, n=3):
  params, state = model.init(jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (n, *model.sample_shape), jnp.float32)
  mask = jnp.arange(n) < n - 1
  fast = fast_cpu(model)

  def loss(m, p, xb):
    logits, new_state = m.apply(p, state, xb, train=True, mask=mask)
    return jnp.sum(jnp.sin(logits)), (logits, new_state)

  (l0, aux0), g0 = jax.jit(lambda p, xb: jax.value_and_grad(lambda *a: loss(model, *a), (0, 1), has_aux=True)(p, xb))(
      params, x)
  (l1, aux1), g1 = jax.jit(lambda p, xb: jax.value_and_grad(lambda *a: loss(fast, *a), (0, 1), has_aux=True)(p, xb))(
      params, x)
  _close((l0, aux0), (l1, aux1))
  _close(g0, g1, rtol=1e-4, atol=1e-5)
  ev0 = model.apply(params, state, x, train=False)[0]
  ev1 = jax.jit(lambda p: fast.apply(p, state, x, train=False))(params)[0]
  _close(ev0, ev1)


def test_plain_cnn_same_values_and_gradients():
  model = Model(PlainCNN(), (12, 12, 1), sample_dtype=jnp.float32)
  assert rewrite_jaxpr_stats(model) == {"conv": 2, "max_pool": 2}
  _check_model(model)


def test_resnet_with_batchnorm_strided_convs_and_pool_stem():
  # imagenet stem: 7x7/2 conv on padded input and an overlapping 3x3/2 max pool (left to XLA); strided 1x1
  # shortcut convolutions; BatchNorm with a mask. (BatchNorm over a few values amplifies float rounding, so the
  # shapes keep a few hundred values per channel.)
  model = Model(ClassifierHead(ResNet(stage_sizes=(1, 1), width=4, stem="imagenet"), num_classes=3), (32, 32, 3),
                sample_dtype=jnp.float32)
  assert rewrite_jaxpr_stats(model) == {"conv": 9}  # stem + 2 bottlenecks x (3 + shortcut)
  _check_model(model, n=6)
  # basic blocks, strided 3x3 convolutions
  model = Model(ClassifierHead(ResNet(stage_sizes=(1, 1), bottleneck=False, width=4, stem="small"), num_classes=3),
                (16, 16, 3), sample_dtype=jnp.float32)
  _check_model(model, n=6)
  assert rewrite_jaxpr_stats(Model(ResNetTiny(), (32, 32, 3))) == {"conv": 17}


@pytest.mark.parametrize("kernel,strides,padding,dilation", [
    ((3, 3), (1, 1), "SAME", (1, 1)), ((3, 2), (2, 1), "VALID", (1, 1)), ((1, 1), (2, 2), "VALID", (1, 1)),
    ((3, 3), (2, 2), ((2, 0), (1, -1)), (2, 1)), ((5, 5), (3, 3), "SAME", (1, 1))])
def test_conv_cases(kernel, strides, padding, dilation):
  conv = nn.Conv(5, kernel, strides, padding=padding, kernel_dilation=dilation)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 10, 3))
  v = conv.init(jax.random.PRNGKey(1), x)
  f = lambda v, x: jnp.sum(jnp.cos(conv.apply(v, x)))  # noqa: E731
  stats = {}
  g0 = jax.grad(f, (0, 1))(v, x)
  g1 = jax.grad(rewrite(f, stats), (0, 1))(v, x)
  assert stats == {"conv": 1}
  _close(f(v, x), rewrite(f)(v, x))
  _close(g0, g1, rtol=1e-4)


@pytest.mark.parametrize("window", [(2, 2), (3, 2), (1, 1)])
def test_max_pool_cases(window):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 3))
  f = lambda x: jnp.sum(jnp.cos(nn.max_pool(x, window, window)) * jnp.arange(3))  # noqa: E731
  _close(f(x), rewrite(f)(x))
  _close(jax.grad(f)(x), jax.grad(rewrite(f))(x))
  # overlapping windows are left to XLA
  stats = {}
  g = lambda x: nn.max_pool(x, (3, 3), (2, 2))  # noqa: E731
  _close(g(x), rewrite(g, stats)(x))
  assert stats == {}


def test_fast_model_equality_and_unwrap():
  model = Model(PlainCNN(), (12, 12, 1))
  assert fast_cpu(model) == fast_cpu(model) and hash(fast_cpu(model)) == hash(fast_cpu(model))
  assert fast_cpu(model) != model and isinstance(fast_cpu(model), FastModel)
  assert fast_cpu(fast_cpu(model)) == fast_cpu(model) and unwrap(fast_cpu(model)) == model


@pytest.mark.parametrize("spec", ["sequential/scan:1", "vmap"])
def test_fedavg_round_same_with_and_without_rewrite(spec, tiny_data):

  model = Model(PlainCNN(), (8, 8, 1))
  params, state = model.init(jax.random.PRNGKey(0))
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(2)
  out = []
  for fast_path in (True, False):
    local = LocalTraining(model, optax.sgd(0.1), batch_size=4, fast_path=fast_path)
    assert isinstance(local.train_model, FastModel) == fast_path
    algo = FedAvg(local, schedule=spec)
    out.append(algo.apply(algo.init(params, state), tiny_data, ids, key))
  _close(out[0][0].params, out[1][0].params, rtol=1e-5, atol=1e-6)
  _close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


def test_fast_path_is_public():
  import fedjax_tl as ftl

  model = ftl.fast_cpu(Model(PlainCNN(), (8, 8, 1)))
  assert ftl.fast_cpu(model) is model  # idempotent, reachable from the flat API
