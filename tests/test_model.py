import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.models.base import Model


class _Plain(nn.Module):
  """A plain flax module: ``__call__(self, x)``, no train or mask."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class _WithArgs(nn.Module):
  """The same network with the full signature (and the same parameter names)."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    del train, mask
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _close(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, **kw)


def test_default_preprocessing_goes_by_dtype():
  """uint8 images are scaled by 1/255 (as before, bit for bit); float features are passed unchanged."""
  model = Model(_WithArgs(), (2, 2, 1), sample_dtype=jnp.float32)
  params, state = model.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  xf = rng.uniform(0, 1, (5, 2, 2, 1)).astype(np.float32)  # features already in [0, 1]
  logits, _ = model.apply(params, state, xf, train=False)
  np.testing.assert_array_equal(logits, _WithArgs().apply({"params": params}, xf))
  xu = rng.integers(0, 256, (5, 2, 2, 1)).astype(np.uint8)
  logits, _ = model.apply(params, state, xu, train=False)
  np.testing.assert_array_equal(logits, _WithArgs().apply({"params": params}, xu.astype(np.float32) / np.float32(255)))
  with pytest.raises(TypeError, match="preprocess=fn"):
    model.apply(params, state, xu.astype(np.int32), train=False)


def test_plain_module_trains_through_fedavg(tiny_data):
  """A module without train/mask arguments runs through FedAvg ("auto" traces it to pick a schedule) and
  computes exactly what the same network with the full signature computes."""
  plain, full = Model(_Plain(), (8, 8, 1)), Model(_WithArgs(), (8, 8, 1))
  params, state = plain.init(jax.random.PRNGKey(0))
  _close(params, full.init(jax.random.PRNGKey(0))[0], rtol=0, atol=0)
  out = {}
  for name, model in (("plain", plain), ("full", full)):
    algo = FedAvg(LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=1), schedule="auto")
    s = algo.init(params, state)
    for r in range(2):
      s, m = algo.apply(s, tiny_data, np.array([0, 1, 3]), jax.random.PRNGKey(r))
    out[name] = (float(m["train_loss"]), s.params)
  assert out["plain"][0] == pytest.approx(out["full"][0], rel=1e-6)
  _close(out["plain"][1], out["full"][1], rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(out["plain"][1])[0], jax.tree.leaves(params)[0])  # it trained
  ev = evaluate(plain, out["plain"][1], state, tiny_data.x, tiny_data.y)
  assert ev["num_examples"] == 40


class _PlainBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1)))


class _BNNoMask(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1)))


class _PlainDropout(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=False)(x.reshape(x.shape[0], -1)))


@pytest.mark.parametrize("module, match", [(_PlainBN(), "takes no `train`.*use_running_average"),
                                           (_BNNoMask(), "takes no `mask`.*padded rows"),
                                           (_PlainDropout(), "takes no `train`.*deterministic")])
def test_modules_that_need_train_or_mask_say_so(module, match):
  with pytest.raises(ValueError, match=match) as e:
    Model(module, (8, 8, 1)).init(jax.random.PRNGKey(0))
  assert "__call__(self, x, train: bool = False, mask=None)" in str(e.value)


class _Layers(nn.Module):
  """Five kernels of five different shapes, each drawn from flax's default truncated-normal initialiser."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in (5, 6, 7, 8):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(3)(x)


class _ConcreteInit(nn.Module):
  """Looks at a concrete value while initialising (not traceable)."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    del train, mask
    x = x.reshape(x.shape[0], -1)
    width = 4 if float(jnp.sum(x)) >= 0 else 5
    return nn.Dense(width)(x)


def test_init_is_one_compiled_program_and_equals_flax_init():
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") \
      else None  # noqa: E731
  model = Model(_Layers(), (4, 4, 1))
  key = jax.random.PRNGKey(3)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    params, state = model.init(key)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiles) <= 2, compiles  # op by op it was one program per kernel shape and per op (> 10)
  expected = _Layers().init(key, jnp.zeros((1, 4, 4, 1)))["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, expected)
  assert state == {}


def test_init_of_a_module_that_needs_concrete_values_still_works():
  params, _ = Model(_ConcreteInit(), (2, 2, 1)).init(jax.random.PRNGKey(0))
  assert params["Dense_0"]["kernel"].shape == (4, 4)
