"""Merging pretrained weights into a freshly initialised model (big_vision style).

``merge(init, loaded, dont_load=[regex, ...])`` takes every parameter from ``loaded`` except those whose
'/'-joined path matches a ``dont_load`` regex (typically a new head), which keep their fresh initialisation.
Any other difference - a parameter missing from the checkpoint, an extra one in it, or a shape or dtype
mismatch - is an error that counts each kind and names the first few (with both shapes), never a silently
half-loaded model.
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
  missing = [f"{p} {tuple(np.shape(flat_init[p]))}" for p in sorted(set(flat_init) - set(flat_loaded)) if not skip(p)]
  extra = [f"{p} {tuple(np.shape(flat_loaded[p]))}" for p in sorted(set(flat_loaded) - set(flat_init)) if not skip(p)]
  shapes = []
  out = {}
  for path, v in flat_init.items():
    if skip(path) or path not in flat_loaded:
      out[path] = v
      continue
    w = flat_loaded[path]
    if np.shape(w) != np.shape(v):
      shapes.append(f"{path}: model {tuple(np.shape(v))} vs loaded {tuple(np.shape(w))}")
      continue
    out[path] = np.asarray(w).astype(np.asarray(v).dtype) if hasattr(v, "dtype") else w
  if missing or extra or shapes:
    parts = [_listing(f"{len(missing)} of the model's {len(flat_init)} parameters missing from the loaded "
                      "weights", missing),
             _listing(f"{len(extra)} of the {len(flat_loaded)} loaded parameters not in the model", extra),
             _listing(f"{len(shapes)} shape mismatches", shapes)]
    raise WeightMismatchError(
        "Loaded weights do not match the model (a file for another architecture, or parameters that are meant to "
        "be re-initialised, e.g. the head, without a dont_load regex):\n  "
        + "\n  ".join(p for p in parts if p))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _listing(title: str, items: list[str], first: int = 5) -> str:
  """'title: a, b, c (and N more)', or '' when there are none: a summary, not hundreds of lines."""
  if not items:
    return ""
  more = f" (and {len(items) - first} more)" if len(items) > first else ""
  return f"{title}: " + ", ".join(items[:first]) + more
