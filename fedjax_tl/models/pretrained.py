"""Merging pretrained weights into a freshly initialised model (big_vision style).

``merge(init, loaded, dont_load=[regex, ...])`` takes every parameter from ``loaded`` except those whose
'/'-joined path matches a ``dont_load`` regex (typically a new head), which keep their fresh initialisation.
Any other difference - a parameter missing from the checkpoint, an extra one in it, or a shape or dtype
mismatch - is an error that names the parameter (and both shapes), never a silently half-loaded model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from fedjax_tl.types import Params

__all__ = ["merge", "WeightMismatchError"]


class WeightMismatchError(ValueError):
  """The loaded weights do not fit the model."""


def merge(init: Params, loaded: Params, dont_load: Sequence[str] = ()) -> Params:
  """``init`` with every parameter replaced by ``loaded``'s, except paths matching ``dont_load``."""
  patterns = [re.compile(p) for p in dont_load]
  skip = lambda path: any(p.search(path) for p in patterns)
  flat_init = {"/".join(k): v for k, v in traverse_util.flatten_dict(init).items()}
  flat_loaded = {"/".join(k): v for k, v in traverse_util.flatten_dict(loaded).items()}
  problems = []
  for path in sorted(set(flat_init) - set(flat_loaded)):
    if not skip(path):
      problems.append(f"missing from the loaded weights: {path} {tuple(np.shape(flat_init[path]))}")
  for path in sorted(set(flat_loaded) - set(flat_init)):
    if not skip(path):
      problems.append(f"in the loaded weights but not in the model: {path} "
                      f"{tuple(np.shape(flat_loaded[path]))}")
  out = {}
  for path, v in flat_init.items():
    if skip(path) or path not in flat_loaded:
      out[path] = v
      continue
    w = flat_loaded[path]
    if np.shape(w) != np.shape(v):
      problems.append(f"shape mismatch at {path}: model {tuple(np.shape(v))} vs loaded {tuple(np.shape(w))}")
      continue
    out[path] = np.asarray(w).astype(np.asarray(v).dtype) if hasattr(v, "dtype") else w
  if problems:
    raise WeightMismatchError(
        "Loaded weights do not match the model (add a dont_load regex for parameters that are meant to be "
        "re-initialised, e.g. the head):\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
