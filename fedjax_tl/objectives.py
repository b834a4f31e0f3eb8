"""Objectives: what local training minimises and what training and evaluation report, for any task.

An :class:`Objective` is one frozen (hashable) object used by local training, :func:`~fedjax_tl.evaluate`,
per-client evaluation and fine-tuning alike, compiled with them:

    stats(outputs, targets, mask) -> dict of sums over the batch's real examples (jnp scalars or vectors);
                                     always "loss" (sum of the loss units) and "count" (how many units)
    summarize(sums)               -> the metrics, e.g. {"loss": loss / count, "accuracy": correct / count}
    check(y, num_outputs, what)   -> raises a ValueError naming the problem and the fix for targets it cannot take

Local training minimises ``stats["loss"] / max(stats["count"], 1)``; sums add across batches, clients and
processes, so every metric is exact over the examples it covers (R^2 from sums of y, y^2 and squared errors).
Built in: :func:`classification` (softmax cross-entropy on integer labels: the default, bit-identical to before),
:func:`multilabel` (sigmoid), :func:`regression` (MSE or MAE; reports MSE, MAE and R^2), :func:`next_token`
(targets ``[N, T]`` with a padding id: token accuracy and perplexity), and :func:`from_loss` for any function of
(outputs, targets) returning per-example losses, with per-example metrics of the user's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Objective", "Classification", "Regression", "MultiLabel", "NextToken", "FromLoss", "WithMetrics",
           "classification", "regression", "multilabel", "next_token", "from_loss", "with_metrics",
           "masked_cross_entropy"]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
  """(mean loss over real rows, sum of losses, number of correct, number of real rows)."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  count = m.sum()
  loss_sum = (per_example * m).sum()
  correct = ((jnp.argmax(logits, -1) == labels) * m).sum()
  return loss_sum / jnp.maximum(count, 1.0), loss_sum, correct, count


def _div(a, b):
  """a / max(b, 1) on device arrays; a / b on host numbers (NaN for b = 0, as numpy)."""
  if isinstance(a, jax.Array) or isinstance(b, jax.Array):
    return a / jnp.maximum(b, 1.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.asarray(a, np.float64) / np.asarray(b, np.float64) if np.ndim(a) or np.ndim(b) else (
        a / b if b else float("nan"))


def _finite(y: np.ndarray, what: str) -> None:
  if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
    bad = int((~np.isfinite(y)).sum())
    raise ValueError(f"{what} hold {bad} non-finite values (NaN or inf): they would make every loss NaN. Drop or "
                     "impute those examples first.")


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base class: override :meth:`stats`, :meth:`summarize` and :meth:`check` (a frozen dataclass)."""

  #: dtype the targets are stored in on device
  target_dtype = jnp.float32

  def stats(self, outputs: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    raise NotImplementedError

  def summarize(self, sums: dict) -> dict:
    return {"loss": _div(sums["loss"], sums["count"])}

  def check(self, y, num_outputs: int | None, what: str = "targets") -> None:
    """Raises if ``y`` (all targets, host or device array, leading axis = examples) cannot be trained on."""

  def loss(self, outputs: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """(the batch's mean loss, its stats): what a local step differentiates."""
    s = self.stats(outputs, targets, mask)
    return s["loss"] / jnp.maximum(s["count"], 1.0), s


@dataclasses.dataclass(frozen=True)
class Classification(Objective):
  """Softmax cross-entropy on integer class indices ``[N]``; reports loss and accuracy (top-1)."""

  target_dtype = jnp.int32

  def stats(self, outputs, targets, mask):
    _, loss_sum, correct, count = masked_cross_entropy(outputs, targets, mask)
    return {"loss": loss_sum, "correct": correct, "count": count}

  def loss(self, outputs, targets, mask):
    mean, loss_sum, correct, count = masked_cross_entropy(outputs, targets, mask)
    return mean, {"loss": loss_sum, "correct": correct, "count": count}

  def summarize(self, sums):
    return {"loss": _div(sums["loss"], sums["count"]), "accuracy": _div(sums["correct"], sums["count"])}

  def check(self, y, num_outputs, what="labels"):
    from fedjax_tl.data.client_data import check_labels

    if num_outputs is not None and num_outputs < 2:
      raise ValueError(f"The model has {num_outputs} output: softmax cross-entropy over a single class is always 0 "
                       "(accuracy 1.0) and trains nothing. Give the model one output per class (at least 2), or use "
                       "another objective: ftl.objectives.multilabel() for a sigmoid output, regression() for a "
                       "real-valued one.")
    check_labels(np.asarray(y), num_outputs or int(np.max(y)) + 1, what)


def _as_outputs(outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """outputs [B, d] and targets [B] or [B, d] as two [B, d] float32 arrays."""
  t = targets.astype(jnp.float32)
  if t.ndim == 1:
    t = t[:, None]
  o = outputs.astype(jnp.float32)
  if o.ndim == 1:
    o = o[:, None]
  return o, t


@dataclasses.dataclass(frozen=True)
class Regression(Objective):
  """Real-valued targets ``[N]`` or ``[N, d]`` against the model's ``d`` outputs; ``loss`` "mse" (default) or
  "mae". Reports loss, mse, mae and r2 (1 - SSE / SST per output, averaged over outputs; over the examples the sums
  cover)."""

  kind: str = "mse"

  def __post_init__(self):
    if self.kind not in ("mse", "mae"):
      raise ValueError(f"regression's loss must be 'mse' or 'mae', got {self.kind!r}.")

  def stats(self, outputs, targets, mask):
    o, t = _as_outputs(outputs, targets)
    m = mask.astype(jnp.float32)
    err = o - t
    se, ae = (err**2).mean(-1), jnp.abs(err).mean(-1)
    return {"loss": ((se if self.kind == "mse" else ae) * m).sum(), "count": m.sum(), "se": (se * m).sum(),
            "ae": (ae * m).sum(), "sse": ((err**2) * m[:, None]).sum(0), "y": (t * m[:, None]).sum(0),
            "y2": ((t**2) * m[:, None]).sum(0)}

  def summarize(self, sums):
    n = sums["count"]
    out = {"loss": _div(sums["loss"], n), "mse": _div(sums["se"], n), "mae": _div(sums["ae"], n)}
    xp = jnp if isinstance(sums["sse"], jax.Array) else np
    sst = sums["y2"] - sums["y"] ** 2 / (xp.maximum(n, 1.0) if xp is jnp else max(float(n), 1.0))
    out["r2"] = xp.mean(1.0 - sums["sse"] / xp.maximum(sst, 1e-12))
    return out

  def check(self, y, num_outputs, what="targets"):
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)) or y.dtype == np.bool_:
      raise ValueError(f"Regression {what} must be numbers, got dtype {y.dtype}.")
    if y.ndim not in (1, 2):
      raise ValueError(f"Regression {what} must have shape [N] or [N, d], got {y.shape}.")
    d = 1 if y.ndim == 1 else y.shape[1]
    if num_outputs is not None and num_outputs != d:
      raise ValueError(f"Regression {what} have {d} value(s) per example but the model has {num_outputs} outputs: "
                       f"build the model with {d} output(s) (e.g. num_classes={d} for a head Dense).")
    _finite(y, f"Regression {what}")


@dataclasses.dataclass(frozen=True)
class MultiLabel(Objective):
  """Sigmoid cross-entropy on 0/1 targets ``[N, K]`` (K independent labels, the model's K outputs; also binary
  classification with K = 1 and targets ``[N]``). Reports loss (mean over labels), accuracy (per label, threshold
  0.5) and exact_match (all K labels right)."""

  def stats(self, outputs, targets, mask):
    o, t = _as_outputs(outputs, targets)
    m = mask.astype(jnp.float32)
    per = optax.sigmoid_binary_cross_entropy(o, t).mean(-1)
    right = ((o > 0) == (t > 0.5)).astype(jnp.float32)
    return {"loss": (per * m).sum(), "count": m.sum(), "correct": (right.mean(-1) * m).sum(),
            "exact": (right.min(-1) * m).sum()}

  def summarize(self, sums):
    n = sums["count"]
    return {"loss": _div(sums["loss"], n), "accuracy": _div(sums["correct"], n), "exact_match": _div(sums["exact"], n)}

  def check(self, y, num_outputs, what="targets"):
    y = np.asarray(y)
    k = 1 if y.ndim == 1 else y.shape[-1]
    if y.ndim not in (1, 2):
      raise ValueError(f"Multi-label {what} must have shape [N, K] (or [N] for one label), got {y.shape}.")
    if num_outputs is not None and num_outputs != k:
      raise ValueError(f"Multi-label {what} have {k} labels per example but the model has {num_outputs} outputs.")
    if not np.isin(y, (0, 1)).all():
      raise ValueError(f"Multi-label {what} must be 0 or 1, got values {np.unique(y)[:6].tolist()}.")


@dataclasses.dataclass(frozen=True)
class NextToken(Objective):
  """Per-position softmax cross-entropy: outputs ``[N, T, V]``, integer targets ``[N, T]`` in [0, V) or
  ``pad_id`` (positions left out of every sum). The loss unit is a token; reports loss (per token), accuracy
  (per token) and perplexity (exp of the loss)."""

  pad_id: int = -1
  target_dtype = jnp.int32

  def stats(self, outputs, targets, mask):
    real = (targets != self.pad_id) & mask[:, None]
    safe = jnp.where(real, targets, 0)
    per = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), safe)
    m = real.astype(jnp.float32)
    return {"loss": (per * m).sum(), "count": m.sum(), "correct": ((jnp.argmax(outputs, -1) == safe) * m).sum()}

  def summarize(self, sums):
    loss = _div(sums["loss"], sums["count"])
    exp = jnp.exp if isinstance(loss, jax.Array) else (np.exp if np.ndim(loss) else math.exp)
    return {"loss": loss, "accuracy": _div(sums["correct"], sums["count"]), "perplexity": exp(loss)}

  def check(self, y, num_outputs, what="targets"):
    y = np.asarray(y)
    if y.ndim != 2 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"Next-token {what} must be integer token ids of shape [N, T], got {y.dtype} {y.shape}.")
    bad = (y != self.pad_id) & ((y < 0) | (num_outputs is not None and y >= (num_outputs or 0)))
    if bad.any():
      raise ValueError(f"{int(bad.sum())} next-token {what} are outside [0, {num_outputs}) and not the padding id "
                       f"{self.pad_id}: give the model one output per token of the vocabulary.")


@dataclasses.dataclass(frozen=True)
class FromLoss(Objective):
  """Any per-example loss ``loss_fn(outputs, targets) -> [B]`` (mean over real examples is minimised), with
  optional per-example metrics ``{name: fn(outputs, targets) -> [B]}`` reported as means over examples. Functions
  must be hashable (module-level functions are)."""

  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = None
  metrics: tuple[tuple[str, Callable], ...] = ()
  target_dtype = jnp.float32

  def __post_init__(self):
    if not callable(self.loss_fn):
      raise TypeError(f"from_loss needs a function (outputs, targets) -> per-example losses, got {self.loss_fn!r}.")
    if isinstance(self.metrics, dict):
      object.__setattr__(self, "metrics", tuple(sorted(self.metrics.items())))

  def stats(self, outputs, targets, mask):
    m = mask.astype(jnp.float32)
    per = self.loss_fn(outputs, targets)
    if per.shape != m.shape:
      raise ValueError(f"from_loss's function returned shape {per.shape}; it must return one loss per example "
                       f"{m.shape}.")
    out = {"loss": (per.astype(jnp.float32) * m).sum(), "count": m.sum()}
    for name, fn in self.metrics:
      out[f"m_{name}"] = (fn(outputs, targets).astype(jnp.float32) * m).sum()
    return out

  def summarize(self, sums):
    n = sums["count"]
    return {"loss": _div(sums["loss"], n), **{name: _div(sums[f"m_{name}"], n) for name, _ in self.metrics}}

  def check(self, y, num_outputs, what="targets"):
    _finite(np.asarray(y), what)


@dataclasses.dataclass(frozen=True)
class WithMetrics(Objective):
  """An objective with more metrics beside its own: ``metrics`` maps a name to ``fn(outputs, targets) -> [B]`` (or
  ``[B, k]``: e.g. per-class indicators), reported as its mean over the real examples (elementwise for ``[B, k]``),
  in training, evaluation and per-client evaluation alike. The loss and the objective's own metrics are unchanged."""

  base: Objective = Classification()
  metrics: tuple[tuple[str, Callable], ...] = ()

  def __post_init__(self):
    if isinstance(self.metrics, dict):
      object.__setattr__(self, "metrics", tuple(sorted(self.metrics.items())))

  @property
  def target_dtype(self):  # noqa: D102
    return self.base.target_dtype

  def stats(self, outputs, targets, mask):
    out = dict(self.base.stats(outputs, targets, mask))
    m = mask.astype(jnp.float32)
    for name, fn in self.metrics:
      v = fn(outputs, targets).astype(jnp.float32)
      out[f"m_{name}"] = (v * m.reshape(-1, *(1,) * (v.ndim - 1))).sum(0)
    return out

  def loss(self, outputs, targets, mask):
    mean, s = self.base.loss(outputs, targets, mask)
    m = mask.astype(jnp.float32)
    for name, fn in self.metrics:
      v = jax.lax.stop_gradient(fn(outputs, targets)).astype(jnp.float32)
      s[f"m_{name}"] = (v * m.reshape(-1, *(1,) * (v.ndim - 1))).sum(0)
    return mean, s

  def summarize(self, sums):
    base = self.base.summarize({k: v for k, v in sums.items() if not k.startswith("m_")})
    return {**base, **{name: _div(sums[f"m_{name}"], sums["count"]) for name, _ in self.metrics}}

  def check(self, y, num_outputs, what="targets"):
    self.base.check(y, num_outputs, what)


def with_metrics(objective: Objective, metrics: dict[str, Callable]) -> WithMetrics:
  """``objective`` reporting ``metrics`` too (per-example functions of (outputs, targets); module-level functions,
  so that the objective stays hashable)."""
  clash = set(metrics) & {"loss", "accuracy", "mse", "mae", "r2", "exact_match", "perplexity", "num_examples"}
  if clash:
    raise ValueError(f"with_metrics: {sorted(clash)} are the objective's own metric names; name yours otherwise.")
  return WithMetrics(objective, tuple(sorted(metrics.items())))


def classification() -> Classification:
  """Softmax cross-entropy on integer labels (the default objective)."""
  return Classification()


def regression(loss: str = "mse") -> Regression:
  """Squared ("mse") or absolute ("mae") error on real-valued targets; reports MSE, MAE and R^2."""
  return Regression(loss)


def multilabel() -> MultiLabel:
  """Independent sigmoid labels ``[N, K]`` (or binary ``[N]``)."""
  return MultiLabel()


def next_token(pad_id: int = -1) -> NextToken:
  """Per-position next-token prediction on targets ``[N, T]`` (``pad_id`` marks padding)."""
  return NextToken(pad_id)


def from_loss(loss_fn: Callable, metrics: dict[str, Callable] | None = None) -> FromLoss:
  """Any per-example loss function of (outputs, targets), with optional per-example metrics."""
  return FromLoss(loss_fn, tuple(sorted((metrics or {}).items())))
