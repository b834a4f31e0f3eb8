import jax
import numpy as np

from fedjax_tl.core.evaluate import eval_batch_size, evaluate
from fedjax_tl.models.base import Model
from fedjax_tl.models.cnn import CNN


def _numpy_reference(logits, y):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(y)), y].mean(), (logits.argmax(-1) == y).mean()


def test_eval_batch_sizes_are_few_buckets():
  assert [eval_batch_size(n, 256) for n in (1, 7, 8, 9, 16, 17, 100, 255, 256, 1000)] == \
      [8, 8, 8, 16, 16, 32, 128, 256, 256, 256]
  assert eval_batch_size(70, 100) == 100 and eval_batch_size(40, 16) == 16
  assert len({eval_batch_size(n) for n in range(1, 257)}) == 6  # 8, 16, ..., 256


def test_per_client_evaluation_compiles_per_bucket_not_per_size():
  """20 evaluation sets of 20 different sizes compile once per power-of-two bucket (4 here, was 20), and give
  the unpadded plain-numpy cross-entropy and accuracy."""
  traces = []

  def counting_preprocess(x):  # runs once per trace of the jitted evaluation step
    traces.append(x.shape)
    return x.astype(np.float32) / 255.0

  module = CNN(num_classes=3, features=(4,), hidden=8)
  model = Model(module, (8, 8, 1), preprocess=counting_preprocess)
  plain = Model(module, (8, 8, 1))
  params, state = plain.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (80, 8, 8, 1)).astype(np.uint8)
  y = rng.integers(0, 3, 80).astype(np.int32)
  sizes = list(range(3, 61, 3))  # 20 sizes, 3..60
  model.num_outputs()  # the label check's one abstract trace (batch 1), cached per model
  traces.clear()
  # the reference logits of all 80 examples in one program (the CNN has no batch statistics, so an example's logits
  # do not depend on its batch), instead of one compile of plain.apply per size
  all_logits = np.asarray(plain.apply(params, state, x, train=False)[0])
  for n in sizes:
    idx = rng.permutation(80)[:n]
    out = evaluate(model, params, state, x[idx], y[idx])
    loss, acc = _numpy_reference(all_logits[idx], y[idx])
    assert out["num_examples"] == n
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], acc, rtol=1e-6)
  assert sorted({s[0] for s in traces}) == [8, 16, 32, 64]
  assert len(traces) == 4
