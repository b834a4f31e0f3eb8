"""The small model interface the federated core needs: init, and apply with train/eval and a padding mask."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_tl.tree import abstract_init, cached
from fedjax_tl.types import ModelState, Params, PRNGKey

__all__ = ["Model", "scale_uint8", "default_preprocess", "init_shapes"]


def scale_uint8(x: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return x.astype(jnp.float32) / 255.0


# XLA debug options for programs that run once (CPU): compile time over run time.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def default_preprocess(x: jax.Array) -> jax.Array:
  """The default preprocessing, chosen by the stored dtype: uint8 images are scaled to float32 [0, 1] (by 1/255);
  floating-point inputs are passed through unchanged (already-scaled features are not divided again); any other
  dtype raises, asking for an explicit ``preprocess``."""
  if x.dtype == jnp.uint8:
    return scale_uint8(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  raise TypeError(f"Model's default preprocessing scales uint8 images by 1/255 and passes floating-point inputs "
                  f"through unchanged; the stored examples are {x.dtype}. Give Model(..., preprocess=fn) that maps "
                  f"them to the module's inputs, e.g. lambda x: x.astype(jnp.float32) / 65535.0 for uint16 images.")


@functools.cache
def _call_arguments(cls: type) -> tuple[bool, bool, str]:
  """(takes ``train``, takes ``mask``, signature text) of a module class's ``__call__``."""
  sig = inspect.signature(cls.__call__)
  params = sig.parameters
  var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
  return "train" in params or var_kw, "mask" in params or var_kw, f"{cls.__name__}.__call__{sig}"


# The abstract init lives on the floor (fedjax_tl.tree), with the per-model cache; the old name stays.
init_shapes = abstract_init


def logits_of(outputs: Any) -> jax.Array:
  """The logits of a model's outputs: the outputs themselves, or ``outputs["logits"]`` for a module that returns a
  dict (e.g. ``{"logits": ..., "features": ...}`` for algorithms that use the representation, such as MOON)."""
  if isinstance(outputs, dict):
    if "logits" not in outputs:
      raise ValueError(f"A module that returns a dict must put its predictions under 'logits' (the objective's "
                       f"outputs); got keys {sorted(outputs)}.")
    return outputs["logits"]
  return outputs


@cached
def _output_shape(model: Model) -> tuple[int, ...]:
  params, state = abstract_init(model)
  x = jax.ShapeDtypeStruct((1, *model.sample_shape), model.sample_dtype)
  out, _ = jax.eval_shape(lambda p, s, xb: model.apply(p, s, xb, train=False), params, state, x)
  return tuple(int(d) for d in logits_of(out).shape[1:])


def _num_outputs(model: Model) -> int:
  return _output_shape(model)[-1]


@cached
def _input_error(model: Model, shape: tuple[int, ...], dtype: str) -> str | None:
  """None if ``model`` (its preprocessing and module, with its own init's params) accepts examples of ``shape``
  and ``dtype``, else the error it raises (traced abstractly; nothing is computed)."""
  try:
    params, state = abstract_init(model)
  except Exception:  # noqa: BLE001  a model that cannot be traced abstractly: nothing to check against
    return None
  x = jax.ShapeDtypeStruct((1, *shape), dtype)
  try:
    jax.eval_shape(lambda p, s, xb: model.apply(p, s, xb, train=False), params, state, x)
  except Exception as e:  # noqa: BLE001  any error of the module on these inputs is the user's shape mismatch
    first = re.sub(r"\s*\(https?://\S+\)", "", (str(e).strip().splitlines() or [""])[0])
    return f"{type(e).__name__}: {first[:300]}"
  return None


_NEEDED_SIGNATURE = "__call__(self, x, train: bool = False, mask=None)"


@dataclasses.dataclass(frozen=True)
class Model:
  """A flax module plus the preprocessing that turns stored examples into its inputs.

  The module's ``__call__(x, train: bool, mask=None)`` returns logits (or a dict with them under "logits" and
  more, e.g. "features", for algorithms that use them; :func:`logits_of`); ``mask`` (bool [batch]) marks real
  examples so that normalisation layers can ignore padding (reshape it to broadcast against the activations,
  e.g. ``BatchNorm()(x, mask=mask[:, None, None, None])``). Non-``params`` collections
  (e.g. ``batch_stats``) are the model *state*, updated in training mode.

  A plain module whose ``__call__(x)`` takes neither ``train`` nor ``mask`` works too: only the arguments its
  signature names are passed. A module with state needs both (``train`` to switch between batch and running
  statistics, ``mask`` to keep padded rows out of them), and one that draws random numbers (dropout) needs
  ``train``; :meth:`init` raises saying so otherwise.

  Attributes:
    module: the flax linen module.
    sample_shape: shape of one stored example, e.g. (8, 8, 1) or (32, 32, 3).
    preprocess: maps a batch of stored examples to model inputs, inside the jitted step. The default,
      :func:`default_preprocess`, goes by dtype: uint8 images are scaled by 1/255 to [0, 1], floating-point
      inputs are passed unchanged; other dtypes need an explicit function.
    sample_dtype: dtype of stored examples (used to build the dummy input of :meth:`init`).
  """

  module: nn.Module
  sample_shape: tuple[int, ...]
  preprocess: Callable[[jax.Array], jax.Array] = default_preprocess
  sample_dtype: Any = jnp.uint8

  def __post_init__(self):
    try:
      object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))
    except TypeError:
      raise TypeError(f"Model's sample_shape must be the shape of one stored example, a sequence of ints such as "
                      f"(32, 32, 3), got {self.sample_shape!r}.") from None

  def _kwargs(self, train: bool, mask: jax.Array | None) -> dict:
    takes_train, takes_mask, _ = _call_arguments(type(self.module))
    kwargs = {"train": train} if takes_train else {}
    if takes_mask:
      kwargs["mask"] = mask
    return kwargs

  def init(self, key: PRNGKey) -> tuple[Params, ModelState]:
    x = jnp.zeros((1, *self.sample_shape), self.sample_dtype)
    takes_train, takes_mask, sig = _call_arguments(type(self.module))
    init = lambda k: self.module.init(k, self.preprocess(x), **self._kwargs(False, None))  # noqa: E731
    try:
      # One compiled program for the whole initialisation: run op by op, every kernel shape compiles its own
      # truncated-normal program (ResNet18: 12 of them, 5.1 s of compiling on 2 CPU cores). It runs once, so on
      # CPU it is compiled without LLVM's optimisations (ResNet18: 0.8 s to compile + 0.4 s to run, against
      # 2.9 s + 0.07 s optimised).
      if isinstance(key, jax.core.Tracer):  # inside a trace (eval_shape, jit): part of that program
        variables = init(key)
      else:
        lowered = jax.jit(init).lower(key)
        options = _QUICK_COMPILE if jax.default_backend() == "cpu" else None
        variables = lowered.compile(compiler_options=options)(key)
    except jax.errors.ConcretizationTypeError:  # a module that needs concrete values while initialising
      variables = init(key)
    try:
      if not takes_train:  # evaluation runs without a dropout key: check abstractly that the module needs none
        jax.eval_shape(lambda v: self.module.apply(v, self.preprocess(x), mutable=True), variables)
    except flax.errors.InvalidRngError as e:
      raise ValueError(f"{sig} draws random numbers (e.g. nn.Dropout) but takes no `train` argument, so it cannot "
                       f"be made deterministic for evaluation. Define {_NEEDED_SIGNATURE} and pass "
                       "deterministic=not train to its dropout layers.") from e
    variables = dict(variables)
    params = variables.pop("params")
    if variables and not takes_train:
      raise ValueError(f"{sig} has the variable collections {sorted(variables)} (e.g. BatchNorm statistics) but "
                       "takes no `train` argument, so training (batch statistics, updated) and evaluation (running "
                       f"statistics) cannot be told apart. Define {_NEEDED_SIGNATURE} and pass "
                       "use_running_average=not train to its BatchNorm layers.")
    if variables and not takes_mask:
      raise ValueError(f"{sig} has the variable collections {sorted(variables)} (e.g. BatchNorm statistics) but "
                       "takes no `mask` argument, so the padded rows of a client's partial last batch would enter "
                       f"its batch statistics. Define {_NEEDED_SIGNATURE} and pass the mask to its BatchNorm "
                       "layers, e.g. nn.BatchNorm(...)(x, mask=mask[:, None, None, None]).")
    return params, variables

  def output_shape(self) -> tuple[int, ...]:
    """One example's output shape (e.g. ``(num_classes,)``, or ``(T, V)`` for a sequence model), from an abstract
    trace."""
    return _output_shape(self)

  def num_outputs(self) -> int:
    """Size of the logits' last axis (the number of classes the model can predict), from an abstract trace."""
    return _num_outputs(self)

  def check_inputs(self, example_shape: tuple[int, ...], dtype: Any, where: str) -> None:
    """Raises a ValueError naming ``where``, both shapes and the fix if stored examples of ``example_shape``
    (one example, without the batch axis) do not fit the model.

    Examples of ``sample_shape`` always pass, at no cost. Others pass if the model accepts them anyway (e.g. a
    fully convolutional network, or a ``preprocess`` that resizes to a fixed size), checked once per shape by an
    abstract trace of :meth:`apply` with the params of :meth:`init`.
    """
    example_shape = tuple(int(d) for d in example_shape)
    if example_shape == self.sample_shape:
      return
    error = _input_error(self, example_shape, str(jnp.dtype(dtype)))
    if error is None:
      return
    module = type(self.module).__name__
    raise ValueError(
        f"{where}: the examples have shape {example_shape} but the model ({module}) was built for "
        f"Model.sample_shape={self.sample_shape}, the shape of one stored example, and fails on them ({error}). "
        f"Resize the data to {self.sample_shape} before building the Dataset / FederatedData, or build the model "
        f"for this data with Model(..., sample_shape={example_shape}) (a preprocess can resize it to what the "
        f"module expects, e.g. ftl.augment.with_resize) and initialise its params again with model.init.")

  def apply(self, params: Params, state: ModelState, x: jax.Array, *, train: bool,
            mask: jax.Array | None = None, rng: PRNGKey | None = None) -> tuple[jax.Array, ModelState]:
    """Logits for a batch of stored examples, and the updated state (unchanged in eval mode)."""
    variables = {"params": params, **state}
    rngs = {"dropout": rng} if rng is not None else None
    x = self.preprocess(x)
    kwargs = self._kwargs(train, mask)
    if train and state:
      logits, new_state = self.module.apply(variables, x, rngs=rngs, mutable=list(state.keys()), **kwargs)
      return logits, dict(new_state)
    return self.module.apply(variables, x, rngs=rngs, **kwargs), state
