"""Splitting a params tree into trainable and frozen parts by regex over '/'-joined paths."""

from __future__ import annotations

import re

from flax import traverse_util

from fedjax_tl.tree import tree_bits
from fedjax_tl.types import Params

__all__ = ["split_params", "param_paths", "tree_bytes"]


def param_paths(params: Params) -> list[str]:
  return ["/".join(k) for k in traverse_util.flatten_dict(params)]


def split_params(params: Params, trainable: str | None) -> tuple[Params, Params]:
  """(trainable, frozen) nested dicts. ``trainable`` is a regex searched in each '/'-joined path; None means
  everything is trainable. A pattern that matches nothing is an error (it is almost always a typo)."""
  if trainable is None:
    return params, {}
  pattern = re.compile(trainable)
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if pattern.search("/".join(k))}
  if not train:
    raise ValueError(f"trainable={trainable!r} matches no parameter; paths look like: "
                     f"{param_paths(params)[:6]}")
  frozen = {k: v for k, v in flat.items() if k not in train}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen) if frozen else {}


def tree_bytes(tree) -> int:
  """Bytes of all array leaves (what sending the tree uncompressed costs): :func:`fedjax_tl.tree.tree_bits` / 8."""
  return tree_bits(tree) // 8
