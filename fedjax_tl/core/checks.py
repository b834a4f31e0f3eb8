"""Checks of what users hand the library, made once where it enters (construction, ``init``, tracing), so that a
misuse raises an error naming our part and the fix instead of a flax/JAX/Python error from deep inside a round.

Nothing here runs per step: trees are compared by their leaves' paths and shapes (traced shapes inside a trace),
which costs nothing at run time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.tree import abstract_init

__all__ = ["leaf_shapes", "tree_diff", "format_diff", "check_optimizer", "check_hashable", "check_numeric_leaves",
           "check_hook_output", "check_model_params", "check_server_update", "round_input"]


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` of every leaf (arrays, tracers, ShapeDtypeStructs, Python numbers), in tree order."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    out["/".join(_key_str(k) for k in path) or "<root>"] = tuple(np.shape(leaf) if shape is None else shape)
  return out


def tree_diff(got: Any, want: Any) -> list[str]:
  """How ``got``'s leaves differ from ``want``'s, by path and shape: missing, unexpected and mis-shaped leaves
  (empty when they match; container types, e.g. dict vs FrozenDict, and dtypes are not compared)."""
  g, w = leaf_shapes(got), leaf_shapes(want)
  lines = [f"{p} has shape {g[p]}, expected {s}" for p, s in w.items() if p in g and g[p] != s]
  lines += [f"{p} {s} is missing" for p, s in w.items() if p not in g]
  lines += [f"{p} {s} is unexpected" for p, s in g.items() if p not in w]
  return lines


def format_diff(lines: list[str], limit: int = 4) -> str:
  """The first ``limit`` differences, '; '-joined, and how many more there are."""
  more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def _describe(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_optimizer(opt: Any, where: str, example: str = "optax.sgd(0.1)") -> None:
  """Raises a TypeError naming ``where`` unless ``opt`` is an optax GradientTransformation (or anything with
  callable ``init`` and ``update``)."""
  if callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None)):
    return
  hint = ""
  if isinstance(opt, int | float) and not isinstance(opt, bool):
    hint = " A learning rate alone is not an optimizer."
  elif callable(opt):
    hint = f" {getattr(opt, '__name__', 'It')} is a function that builds one: call it with its learning rate."
  raise TypeError(f"{where} must be an optax GradientTransformation (an object with init and update), got "
                  f"{_describe(opt)}.{hint} Pass e.g. {example}.")


def check_hashable(obj: Any, where: str) -> None:
  """Raises a TypeError naming ``obj``'s class and its unhashable field if ``obj`` (static configuration of
  compiled programs: equal objects share them) cannot be hashed."""
  try:
    hash(obj)
    return
  except TypeError:
    pass
  cls = type(obj).__name__
  why = ("it is part of the compiled programs' static configuration (equal configurations share their "
         "programs), so it and every field must be hashable")
  for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
    value = getattr(obj, f.name)
    try:
      hash(value)
    except TypeError:
      raise TypeError(f"{where}: {cls}.{f.name} is unhashable (a {type(value).__name__}), and {why}. Make "
                      f"{f.name} a tuple (e.g. {f.name}=tuple(...)) or another hashable value; arrays, and anything "
                      "that changes during training, belong in the algorithm's state (Hooks.server_init / "
                      "client_init), not in its fields.") from None
  raise TypeError(f"{where}: {cls} is unhashable, and {why}. Declare it with @dataclasses.dataclass(frozen=True) "
                  "(and no __eq__ of its own) and give it hashable fields only (tuples, numbers, strings).")


def check_numeric_leaves(tree: Any, where: str) -> None:
  """Raises a TypeError naming ``where`` and the leaf if a leaf of ``tree`` is not an array or a number."""
  for path, leaf in zip(leaf_shapes(tree), jax.tree.leaves(tree), strict=True):
    if isinstance(leaf, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct | bool | int | float):
      continue
    raise TypeError(f"{where}: {path} is a {type(leaf).__name__}; every leaf must be a numeric array or number "
                    "(it is summed over the cohort and counted in the uplink as float32).")


def check_hook_output(hooks: Any, method: str, out: Any, **expected: Any) -> Any:
  """``out``, the result of ``hooks.<method>`` (at trace time), after checking it against the Hooks contract: a
  tuple of the documented length whose delta/grads and states have the structure and shapes of what the method
  was given, and a message of numeric leaves. Costs nothing at run time (shapes only)."""
  where = f"{type(hooks).__name__}.{method}"
  names = {"grads": ("grads", "state"), "finish": ("delta", "message", "client_state")}[method]
  optional = {"grads": ("skip",), "finish": ("metrics",)}[method]
  if not isinstance(out, tuple | list) or not len(names) <= len(out) <= len(names) + len(optional):
    raise TypeError(f"{where} must return a tuple ({', '.join(names)}) or ({', '.join(names + optional)}), got "
                    f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, tuple | list) else ''}.")
  got = dict(zip(names + optional, out, strict=False))
  if method == "grads" and "skip" in got and jnp.shape(got["skip"]) != ():
    raise ValueError(f"{where}'s third value (skip this step) must be a bool scalar, got shape "
                     f"{jnp.shape(got['skip'])}.")
  if method == "finish" and "metrics" in got:
    m = got["metrics"]
    if not isinstance(m, dict) or any(jnp.shape(v) != () for v in m.values()):
      raise ValueError(f"{where}'s fourth value (the client's own metrics) must be a dict of scalars, got "
                       f"{jax.tree.map(jnp.shape, m) if isinstance(m, dict) else type(m).__name__}.")
  for name, want in expected.items():
    if name == "state":  # the local-training state: free-form, but it must keep its structure from step to step
      what = "the local-training state it was given (from start() or the previous step)"
    elif name == "client_state":
      what = "the client's persistent state it was given in ctx.client_state (client_init's structure)"
      if not jax.tree.leaves(want) and not jax.tree.leaves(got[name]):
        continue
    else:
      what = f"the {name} it was given (the trainable params' tree, local_params excluded)"
    diff = tree_diff(got[name], want)
    if diff:
      raise ValueError(f"{where} returned a {name} that does not match {what}: {format_diff(diff)}. Return it with "
                       f"the same structure and per-client shapes (e.g. jax.tree.map over the given {name}).")
  if "message" in got:
    check_numeric_leaves(got["message"], f"{where}'s message")
  return out


def check_model_params(model, params, model_state) -> None:
  """Raises naming the first differing paths and shapes if ``params`` / ``model_state`` are not the model's."""
  try:
    want_params, want_state = abstract_init(model)
  except Exception:  # noqa: BLE001  a model that cannot be initialised abstractly: nothing to compare against
    return
  which = f"the LocalTraining's model ({type(model.module).__name__}, sample_shape={model.sample_shape})"
  diff = tree_diff(params, want_params)
  if diff:
    raise ValueError(f"FedAvg.init: the params are not those of {which}: {format_diff(diff)}. Pass the params "
                     "of this model's own init (params, model_state = model.init(key)), or load saved or "
                     "pretrained weights into them with ftl.pretrained.merge(params, loaded, dont_load=[...]), "
                     "which names every missing, extra or mis-shaped parameter.")
  diff = tree_diff(model_state or {}, want_state)
  if diff:
    raise ValueError(f"FedAvg.init: the model_state is not that of {which}: {format_diff(diff)}. Pass the "
                     "model_state of this model's own init (the second value of model.init(key): e.g. BatchNorm "
                     "statistics; {} for a model without state), or the one saved with these params.")


def check_server_update(hooks, out: Any, mean_delta: Any, algorithm_state: Any) -> None:
  """At trace time: ``Hooks.server_update`` returned (a mean delta shaped as the params, a state shaped as the
  one it was given)."""
  where = f"{type(hooks).__name__}.server_update"
  if not isinstance(out, tuple | list) or len(out) != 2:
    raise TypeError(f"{where} must return a tuple (mean_delta, new algorithm state), got {type(out).__name__}.")
  diff = tree_diff(out[0], mean_delta)
  if diff:
    raise ValueError(f"{where} returned a mean_delta that does not match the trainable params (the mean_delta "
                     f"it was given): {format_diff(diff)}. Return it with the same structure and shapes (e.g. "
                     "jax.tree.map over the given mean_delta).")
  diff = tree_diff(out[1], algorithm_state)
  if diff:
    raise ValueError(f"{where} returned a new algorithm state that does not match the state it was given "
                     f"(server_init's structure): {format_diff(diff)}. Keep the state's structure and shapes from "
                     "round to round (they are the compiled round's and the checkpoint's).")


def round_input(value, client_ids: np.ndarray, name: str, kind: type) -> np.ndarray | None:
  """A per-client round input (``reported`` / ``step_budget``) as a host array aligned with ``client_ids``, or an
  error naming what is wrong."""
  if value is None:
    return None
  a = np.asarray(value)
  if a.shape != client_ids.shape:
    raise ValueError(f"FedAvg.apply's {name} has shape {a.shape}; it must have one entry per client of the cohort "
                     f"(shape {client_ids.shape}), in the order of client_ids.")
  if kind is bool:
    if a.dtype != np.bool_:
      raise TypeError(f"FedAvg.apply's reported must be a bool array (True: the client reports), got dtype {a.dtype}.")
    return a
  if not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
    raise ValueError(f"FedAvg.apply's step_budget must hold integers >= 0 (each client's most local steps this "
                     f"round), got {a[:5].tolist()} (dtype {a.dtype}).")
  return a.astype(np.int64)
