import numpy as np
import pytest

from fedjax_tl.models.pretrained import WeightMismatchError, merge


def _tree():
  return {"conv": {"kernel": np.ones((3, 3, 1, 4)), "bias": np.zeros(4)}, "head": {"kernel": np.ones((8, 5))}}


def test_merge_loads_everything_but_dont_load():
  init = _tree()
  loaded = {"conv": {"kernel": np.full((3, 3, 1, 4), 2.0), "bias": np.full(4, 3.0)},
            "head": {"kernel": np.full((8, 10), 9.0)}}
  out = merge(init, loaded, dont_load=["^head/"])
  assert (out["conv"]["kernel"] == 2).all() and (out["conv"]["bias"] == 3).all()
  assert (out["head"]["kernel"] == 1).all() and out["head"]["kernel"].shape == (8, 5)


def test_merge_names_every_mismatch():
  init = _tree()
  loaded = {"conv": {"kernel": np.ones((3, 3, 2, 4))}, "extra": {"w": np.ones(2)},
            "head": {"kernel": np.ones((8, 5))}}
  with pytest.raises(WeightMismatchError) as e:
    merge(init, loaded)
  msg = str(e.value)
  assert "conv/bias" in msg and "missing" in msg
  assert "extra/w" in msg
  assert "conv/kernel" in msg and "(3, 3, 1, 4)" in msg and "(3, 3, 2, 4)" in msg
