import jax
import numpy as np
import pytest

from fedjax_tl.models.cnn import CNN


def test_im2col_conv_is_the_same_function_with_the_same_params():
  x = np.random.default_rng(0).random((3, 12, 12, 2)).astype(np.float32)
  xla = CNN(num_classes=4, features=(5, 6), hidden=7, conv="xla")
  im2col = CNN(num_classes=4, features=(5, 6), hidden=7, conv="im2col")
  # each computation jitted: one compile per program instead of one per op (op by op: ~3x the time)
  params = jax.jit(xla.init)(jax.random.PRNGKey(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, jax.eval_shape(im2col.init, jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(jax.jit(im2col.apply)(params, x), jax.jit(xla.apply)(params, x), rtol=1e-5, atol=1e-5)
  g1 = jax.jit(jax.grad(lambda p: xla.apply(p, x).sum()))(params)
  g2 = jax.jit(jax.grad(lambda p: im2col.apply(p, x).sum()))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # vmapped over clients, each with its own params (as in a chunked round): the hand-written backward agrees
  stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), params)
  gx = jax.jit(jax.vmap(jax.grad(lambda p: xla.apply(p, x).sum())))(stacked)
  gi = jax.jit(jax.vmap(jax.grad(lambda p: im2col.apply(p, x).sum())))(stacked)
  for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="conv must be"):
    CNN(conv="fft").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("shape,ties", [((2, 8, 6, 3), False), ((2, 7, 9, 3), False), ((2, 8, 6, 3), True)])
def test_max_pool_2x2_matches_reduce_window_values_and_gradients(shape, ties):
  import flax.linen as nn

  from fedjax_tl.models.cnn import max_pool_2x2
  rng = np.random.default_rng(1)
  x = (rng.integers(0, 2, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
  ref = lambda v: nn.max_pool(v, (2, 2), (2, 2))  # noqa: E731
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  w = np.random.default_rng(2).standard_normal(ref(x).shape).astype(np.float32)
  g1 = jax.grad(lambda v: (ref(v) * w).sum())(x)
  g2 = jax.jit(jax.grad(lambda v: (max_pool_2x2(v) * w).sum()))(x)
  np.testing.assert_array_equal(g1, g2)
  gv = jax.vmap(jax.grad(lambda v, w: (max_pool_2x2(v[None]) * w).sum()))(x, w)  # per-example, as per client
  np.testing.assert_array_equal(gv, g1)
  assert np.count_nonzero(g2) == w.size  # one winner per window, odd trailing rows/columns get nothing
