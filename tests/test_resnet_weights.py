"""Converted Keras ResNet50 weights give the same features as Keras (parity), and bad files fail loudly."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import hashlib

import h5py
import jax
import numpy as np
import pytest

from fedjax_tl.models import resnet, weights
from fedjax_tl.models.base import Model
from fedjax_tl.models.pretrained import WeightMismatchError, merge

keras = pytest.importorskip("keras")


def write_legacy_keras_h5(model, path):
  """The layout of Keras Applications' ImageNet files (Keras 2 era): root attrs layer_names/backend/
  keras_version; per layer a group with attr weight_names ('<layer>/<kind>:0') and datasets at those paths."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for layer in model.layers:
      g = f.create_group(layer.name)
      names = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
      g.attrs["weight_names"] = names
      for n, w in zip(names, layer.weights):
        g.create_dataset(n.decode(), data=np.asarray(w.numpy()))


@pytest.fixture(scope="module")
def keras_resnet50_file(tmp_path_factory):
  model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:  # non-trivial BN statistics and affine params, so the test can fail
    if isinstance(layer, keras.layers.BatchNormalization):
      g, b, m, v = (w.numpy() for w in layer.weights)
      layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                         rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 2.0, v.shape)])
  path = str(tmp_path_factory.mktemp("w") / weights.KERAS_RESNET50_NOTOP.filename)
  write_legacy_keras_h5(model, path)
  return model, path


def test_keras_reads_our_test_file_like_the_imagenet_file(keras_resnet50_file):
  from keras.src.legacy.saving import legacy_h5_format

  model, path = keras_resnet50_file
  fresh = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
  with h5py.File(path, "r") as f:
    legacy_h5_format.load_weights_from_hdf5_group(f, fresh)
  for a, b in zip(model.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_converted_resnet50_matches_keras_features(keras_resnet50_file):
  kmodel, path = keras_resnet50_file
  params, state = weights.load_keras_resnet50(path)
  model = Model(resnet.ResNet50(), (64, 64, 3), preprocess=resnet.caffe_preprocess)
  init_params, init_state = model.init(jax.random.PRNGKey(0))
  params = merge(init_params, params)  # every parameter present, every shape right
  state = merge(init_state, state)
  x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  ours, _ = model.apply(params, state, x, train=False)
  theirs = np.asarray(kmodel(keras.applications.resnet.preprocess_input(x.astype(np.float32))))
  rel = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
  print(f"ResNet50 Keras parity: relative error {rel:.2e}")
  assert ours.shape == (2, 2048)
  assert rel < 1e-4


def test_head_merge_and_mismatch(keras_resnet50_file):
  _, path = keras_resnet50_file
  params, state = weights.load_keras_resnet50(path)
  full = Model(resnet.ClassifierHead(resnet.ResNet50(), num_classes=10, hidden=(128,)), (32, 32, 3),
               preprocess=resnet.caffe_preprocess)
  init_params, _ = full.init(jax.random.PRNGKey(0))
  merged = merge(init_params, {"backbone": params}, dont_load=["^head"])
  np.testing.assert_array_equal(merged["backbone"]["conv1_conv"]["kernel"], params["conv1_conv"]["kernel"])
  assert merged["head"]["kernel"].shape == (128, 10)
  with pytest.raises(WeightMismatchError, match="head"):
    merge(init_params, {"backbone": params})  # forgot dont_load: the head is missing from the file
  # another architecture: merge compares shapes only, so its abstract params (no 4 s compile of an init) suffice
  small = jax.eval_shape(lambda k: Model(resnet.ResNet(stage_sizes=(3, 4, 6, 3), width=32), (32, 32, 3)).init(k)[0],
                         jax.random.PRNGKey(0))
  with pytest.raises(WeightMismatchError, match=r"conv1_conv/kernel: model \(7, 7, 3, 32\) vs loaded"):
    merge(small, params)


def test_truncated_or_corrupt_files_raise(tmp_path, keras_resnet50_file):
  _, path = keras_resnet50_file
  data = open(path, "rb").read()
  trunc = tmp_path / "trunc.h5"
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(weights.WeightFileError):
    weights.load_keras_resnet50(str(trunc))
  with pytest.raises(weights.WeightFileError, match="does not exist"):
    weights.load_keras_resnet50(str(tmp_path / "nope.h5"))
  not_keras = tmp_path / "plain.h5"
  with h5py.File(not_keras, "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(weights.WeightFileError, match="layer_names"):
    weights.load_keras_resnet50(str(not_keras))


def test_cache_verification_and_offline_error(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_TL_CACHE", str(tmp_path))
  monkeypatch.delenv("FEDJAX_TL_RESNET50_WEIGHTS", raising=False)
  content = b"pretend weights"
  src = weights.WeightSource("t", "http://127.0.0.1:9/none.h5", "t.h5", md5=hashlib.md5(content).hexdigest(),
                             size=len(content), sha256_env="FEDJAX_TL_TEST_SHA")
  (tmp_path / "t.h5").write_bytes(content)
  assert weights.fetch(src) == str(tmp_path / "t.h5")  # MD5 ok -> SHA-256 recorded beside it
  assert (tmp_path / "t.h5.sha256").read_text().strip() == hashlib.sha256(content).hexdigest()
  (tmp_path / "t.h5").write_bytes(b"pretend weighTs")  # same size, one byte flipped
  with pytest.raises(weights.WeightFileError, match="SHA-256"):
    weights.fetch(src)
  monkeypatch.setenv("FEDJAX_TL_TEST_SHA", "0" * 64)
  (tmp_path / "t.h5").write_bytes(content)
  with pytest.raises(weights.WeightFileError, match="SHA-256"):
    weights.fetch(src)
  (tmp_path / "t.h5").unlink()
  with pytest.raises(weights.WeightFileError, match="Could not download.*without network|Without network"):
    weights.fetch(src)
  assert not list(tmp_path.glob("*.part"))  # no partial file left behind


@pytest.mark.parametrize("ctor", [resnet.ResNetTiny, lambda: resnet.ResNetTiny(norm="group"),
                                  lambda: resnet.ResNet(stage_sizes=(1, 1), bottleneck=False, width=4,
                                                        stem="small")])
def test_resnet_variants_run(ctor):
  model = Model(resnet.ClassifierHead(ctor(), num_classes=3), (32, 32, 3))
  params, state = model.init(jax.random.PRNGKey(0))
  x = np.zeros((2, 32, 32, 3), np.uint8)
  logits, new_state = model.apply(params, state, x, train=True, mask=np.array([True, False]))
  assert logits.shape == (2, 3)
  assert set(new_state) == set(state)
