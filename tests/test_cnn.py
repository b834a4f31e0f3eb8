import jax
import numpy as np
import pytest

from fedjax_tl.models.cnn import CNN


def test_im2col_conv_is_the_same_function_with_the_same_params():
  x = np.random.default_rng(0).random((3, 12, 12, 2)).astype(np.float32)
  xla = CNN(num_classes=4, features=(5, 6), hidden=7, conv="xla")
  im2col = CNN(num_classes=4, features=(5, 6), hidden=7, conv="im2col")
  params = xla.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, im2col.init(jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(im2col.apply(params, x), xla.apply(params, x), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda p: xla.apply(p, x).sum())(params)
  g2 = jax.grad(lambda p: im2col.apply(p, x).sum())(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="conv must be"):
    CNN(conv="fft").init(jax.random.PRNGKey(0), x)
