import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.data import augment


def test_crop_flip_keeps_shape_dtype_and_content():
  x = np.arange(2 * 6 * 6 * 1, dtype=np.uint8).reshape(2, 6, 6, 1)
  out = np.asarray(augment.random_crop_flip(jax.random.PRNGKey(0), jnp.asarray(x), pad=2))
  assert out.shape == x.shape and out.dtype == np.uint8
  for i in range(2):
    # every output is a (possibly flipped) window of the zero-padded image
    padded = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))
    windows = [padded[a:a + 6, b:b + 6] for a in range(5) for b in range(5)]
    windows += [w[:, ::-1] for w in windows]
    assert any(np.array_equal(out[i], w) for w in windows)


def test_crop_flip_is_random_per_example_and_keyed():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 8, 8, 3)).astype(np.uint8))
  a = augment.random_crop_flip(jax.random.PRNGKey(1), x)
  b = augment.random_crop_flip(jax.random.PRNGKey(1), x)
  c = augment.random_crop_flip(jax.random.PRNGKey(2), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  unchanged = np.mean([np.array_equal(a[i], x[i]) for i in range(64)])
  assert unchanged < 0.2  # 1/81 crops x 1/2 flips leave an image as it was


def test_resize():
  x = jnp.ones((2, 8, 8, 3)) * jnp.arange(3.0)
  y = augment.resize(x, 16)
  assert y.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(y, jnp.ones((2, 16, 16, 3)) * jnp.arange(3.0), atol=1e-6)  # constant stays constant
  assert augment.resize(x, 8) is x
  f = augment.with_resize(lambda v: v.astype(jnp.float32) / 255.0, 4)
  assert f(jnp.zeros((1, 8, 8, 3), jnp.uint8)).shape == (1, 4, 4, 3)
