"""Batched evaluation of a model on a held-out set (a few fixed batch shapes, padding masked)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import keys
from fedjax_tl.core.client import LocalTraining, merge_params, stats_shapes
from fedjax_tl.core.params import split_params
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.models.base import Model, logits_of
from fedjax_tl.objectives import Classification, Objective
from fedjax_tl.tree import abstract_init
from fedjax_tl.types import ModelState, Params

__all__ = ["evaluate", "eval_batch_size", "evaluate_per_client", "client_summary"]

_MIN_BUCKET = 8


def eval_batch_size(n: int, batch_size: int = 256) -> int:
  """The batch shape ``evaluate`` uses for ``n`` examples: ``batch_size``, or for a smaller set the next power
  of two (at least 8), so evaluation sets of any size below ``batch_size`` compile at most
  ~log2(batch_size) programs instead of one per distinct size."""
  if n >= batch_size:
    return batch_size
  return min(batch_size, max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _eval_batch(model: Model, params, state, x, y, mask, objective: Objective):
  out, _ = model.apply(params, state, x, train=False)
  return objective.stats(logits_of(out), y, mask)


def _check_finite_inputs(x, where: str) -> None:
  """Raises if floating-point examples hold NaN or inf (they would give NaN or meaningless metrics)."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    bad = int(np.sum(~np.isfinite(np.asarray(x)))) if not isinstance(x, jax.Array) else int(jnp.sum(~jnp.isfinite(x)))
    if bad:
      raise ValueError(f"{where}: the examples hold {bad} non-finite values (NaN or inf); their metrics would be NaN "
                       "or meaningless. Drop or impute those examples (e.g. np.nan_to_num) first.")


def evaluate(model: Model, params: Params, model_state: ModelState, x, y, batch_size: int = 256,
             objective: Objective | None = None) -> dict:
  """The objective's metrics of ``model`` on (x, y) plus "num_examples", as Python floats: by default
  (:func:`~fedjax_tl.objectives.classification`) {"loss", "accuracy", "num_examples"}.

  ``y`` must be targets the objective takes (for classification: integer class indices in [0, number of model
  outputs); a ValueError names any others); floating-point ``x`` must be finite.

  Batches have ``eval_batch_size(len(y), batch_size)`` rows (a set smaller than ``batch_size`` is padded up to
  a power of two; padded rows are masked out of every sum), so a model compiles once per bucket, not once per
  evaluation-set size (per-client evaluation of 20 clients of 20 sizes: at most 6 programs). Host arrays
  (numpy, ``np.memmap``) stay on the host: each batch is moved to the device on its own.
  """
  n = len(y)
  if n == 0:
    raise ValueError("Cannot evaluate on an empty dataset.")
  objective = Classification() if objective is None else objective
  k = model.num_outputs()
  what = "evaluation labels" if isinstance(objective, Classification) else "evaluation targets"
  objective.check(y, k, f"{what} (the model has {k} outputs)")
  # Host arrays (numpy, np.memmap: e.g. HostFederatedData's x and y) move one batch at a time.
  on_host = not isinstance(x, jax.Array)
  dtype = objective.target_dtype
  x, y = (x, np.asarray(y, dtype)) if on_host else (jnp.asarray(x), jnp.asarray(y, dtype))
  model.check_inputs(x.shape[1:], x.dtype, "evaluate")
  _check_finite_inputs(x, "evaluate")
  b = eval_batch_size(n, batch_size)
  total = None
  for start in range(0, n, b):
    idx = np.minimum(np.arange(start, start + b), n - 1)
    mask = jnp.asarray(np.arange(start, start + b) < n)
    sums = _eval_batch(model, params, model_state, x[idx], y[idx], mask, objective)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  total = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64)) for k, v in total.items()}
  return {**{k: (float(v) if np.ndim(v) == 0 else v) for k, v in objective.summarize(total).items()},
          "num_examples": int(total["count"]) if isinstance(objective, Classification) else n}


# ---- per-client (personalized) evaluation ----


def _is_stacked(tree, ref, num_clients: int, what: str) -> bool:
  """Whether ``tree`` is one model's ``ref``-shaped tree (False) or one per client, stacked (True)."""
  shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(tree)]
  want = [tuple(r.shape) for r in jax.tree.leaves(ref)]
  if shapes == want:
    return False
  if shapes == [(num_clients, *w) for w in want]:
    return True
  raise ValueError(f"{what} must be the model's {what} (leaf shapes {want[:3]}...) or one per client stacked on a "
                   f"leading axis of {num_clients} clients; got leaf shapes {shapes[:3]}...")


@functools.partial(jax.jit, static_argnames=("model", "local", "trainable", "batch", "num_batches", "chunk",
                                             "stacked_params", "stacked_state", "objective"))
def _per_client(params, model_state, x_train, y_train, train_idx, train_n, x_test, y_test, test_idx, test_n, ids,
                key, *, model, local, trainable, batch, num_batches, chunk, stacked_params, stacked_state, objective):
  """The objective's sums ``{name: [C, ...]}`` of every client on its test rows, after ``local.steps`` local
  steps."""
  rows = jnp.maximum(ids, 0)  # padding clients (id -1) read client 0's params and count nothing
  if stacked_params:
    params = jax.tree.map(lambda a: a[rows], params)
  if stacked_state:
    model_state = jax.tree.map(lambda a: a[rows], model_state)

  def one(p, ms, tr_idx, tr_n, te_idx, te_n, cid):
    if local is not None:  # fine-tune: ``local.steps`` steps of the client's own training (LocalTraining.step)
      train, frozen = split_params(p, trainable)
      st = local.init(train, ms, keys.client(key, cid), tr_n, targets=y_train)
      st = jax.lax.fori_loop(0, local.steps, lambda t, s: local.step(s, t, frozen, x_train, y_train, tr_idx), st)
      p, ms = merge_params(st.params, frozen), st.model_state

    def stats(j):
      idx = jax.lax.dynamic_slice(te_idx, (j * batch,), (batch,))
      mask = j * batch + jnp.arange(batch) < te_n
      out, _ = model.apply(p, ms, x_test[idx], train=False)
      return objective.stats(logits_of(out), y_test[idx], mask)

    def body(total, j):
      return jax.tree.map(jnp.add, total, stats(j)), None

    zero = {k: jnp.zeros(v.shape, v.dtype) for k, v in stats_shapes(objective, tuple(y_test.shape[1:]),
                                                                      str(y_test.dtype), model).items()}
    return jax.lax.scan(body, zero, jnp.arange(num_batches))[0]

  per_client = (params if stacked_params else None, model_state if stacked_state else None,
                train_idx, train_n, test_idx, test_n, ids)
  axes = tuple(None if a is None else 0 for a in per_client)
  shared = {"p": None if stacked_params else params, "ms": None if stacked_state else model_state}

  def chunk_fn(xs):
    def f(p, ms, *rest):
      return one(shared["p"] if p is None else p, shared["ms"] if ms is None else ms, *rest)
    return jax.vmap(f, in_axes=axes)(*xs)

  c = ids.shape[0]
  split = lambda a: None if a is None else jax.tree.map(lambda v: v.reshape(c // chunk, chunk, *v.shape[1:]), a)
  out = jax.lax.map(chunk_fn, tuple(split(a) for a in per_client))
  return jax.tree.map(lambda a: a.reshape(c, *a.shape[2:]), out)


def client_summary(values, num_examples) -> dict:
  """{"weighted_mean", "mean", "p10"} of per-client ``values`` over the clients with test examples: the mean
  weighted by their numbers of test examples (= the pooled metric over all their examples), the plain mean over
  clients, and the 10th percentile over clients (numpy's linear interpolation; for accuracy, the level the worst
  10% of clients fall below)."""
  values, w = np.asarray(values, np.float64), np.asarray(num_examples, np.float64)
  ok = w > 0
  if not ok.any():
    raise ValueError("No client has test examples.")
  v, w = values[ok], w[ok]
  return {"weighted_mean": float(np.average(v, weights=w)), "mean": float(np.mean(v)),
          "p10": float(np.percentile(v, 10))}


def evaluate_per_client(model: Model, params: Params, model_state: ModelState, test: FederatedData, *,
                        finetune: int = 0, local: LocalTraining | None = None, train: FederatedData | None = None,
                        trainable: str | None = None, key: jax.Array | None = None, batch_size: int = 256,
                        chunk_size: int | None = None, objective: Objective | None = None) -> dict:
  """Accuracy and loss of every client on its own held-out examples, optionally after fine-tuning it locally.

  Personalized evaluation for any algorithm (e.g. Wang et al. 2019, "Federated Evaluation of On-device
  Personalization"): client ``c`` starts from ``params`` (the global model) or from ``params[c]`` (its own model,
  e.g. FedPer's head with the shared body: ``state.all_client_params()``), optionally runs ``finetune`` steps of
  ``local``'s training (its optimizer, freshly initialised; batch size, augmentation, normalisation mode) on
  its examples in ``train``, then is evaluated on its examples in ``test``. Get ``train``/``test`` from
  ``data.split_clients(test_fraction, seed)``.

  All clients run in one compiled program, whatever their sizes: clients are vmapped ``chunk_size`` at a time
  (default: all at once) inside one ``lax.map``; each client's test examples are padded to
  ``eval_batch_size(test.pad_size, batch_size)``-row batches and its training examples to ``train.pad_size``,
  with padding masked out of every sum, every gradient and every step (a client with no training examples is
  not fine-tuned). A later call recompiles only if the populations' padded sizes, the model, ``local``,
  ``finetune`` or the params' shapes change.

  Args:
    model: the model.
    params: one params tree for every client, or a tree stacked ``[test.num_clients, ...]`` (one per client).
    model_state: the model state (e.g. batch_stats), shared or stacked likewise (FedBN, ``model_state="local"``:
      ``state.client_states``).
    test: the clients' held-out examples.
    finetune: number of local steps k before evaluating (0: evaluate ``params`` as given).
    local: the clients' local training (needed when ``finetune > 0``; its ``epochs``/``steps`` are replaced by
      ``finetune`` steps; a client cycles through reshuffled epochs of its training examples at its batch size).
    train: the clients' training examples (needed when ``finetune > 0``; the same client ids as ``test``).
    trainable: regex of the params that fine-tuning changes (e.g. "^head/"); None: all of them.
    key: PRNG key of fine-tuning (client c's shuffling, augmentation and dropout use ``keys.client(key, c)``);
      default ``PRNGKey(0)``.
    batch_size: evaluation batch size (smaller test sets are padded to a power of two, as in :func:`evaluate`).
    chunk_size: clients vmapped at once (bounds memory; default all); 1 runs them one after another inside the
      program, which XLA:CPU prefers for models with convolutions (ResNets), as the ``sequential`` schedule.
    objective: what to report (:mod:`fedjax_tl.objectives`); default ``local``'s objective if given, else
      classification.

  Returns:
    ``{"accuracy", "loss", "num_examples"}`` (for classification; another objective's metrics otherwise): numpy
    arrays ``[num_clients]`` (metrics are NaN for a client without test examples), plus ``"summary"``:
    ``{"accuracy": client_summary(...), "loss": client_summary(...), "num_clients": clients with test examples}``
    (weighted mean, mean and 10th percentile over clients).
  """
  num_clients = test.num_clients
  for name, d in (("test", test), ("train", train)):
    if d is not None and not isinstance(d.x, jax.Array):
      raise ValueError(f"evaluate_per_client needs {name}'s examples on device, got host arrays "
                       f"({type(d).__name__}): pass {name}.to_device() (a FederatedData of the same clients), or "
                       "evaluate a subset of clients built with FederatedData.")
  model.check_inputs(test.x.shape[1:], test.x.dtype, "evaluate_per_client (test)")
  shapes_params, shapes_state = abstract_init(model)
  stacked_params = _is_stacked(params, shapes_params, num_clients, "params")
  stacked_state = _is_stacked(model_state, shapes_state, num_clients, "model_state")
  outputs = model.num_outputs()
  if objective is None:
    objective = local.objective if local is not None else Classification()
  if isinstance(objective, Classification) and test.label_range is not None:
    if test.label_range[1] >= outputs or outputs < 2:
      objective.check(np.asarray(test.y), outputs, f"evaluation labels (the model has {outputs} outputs)")
  else:
    objective.check(np.asarray(test.y), outputs, f"evaluation targets (the model has {outputs} outputs)")
  _check_finite_inputs(test.x, "evaluate_per_client (test)")
  if finetune < 0:
    raise ValueError(f"finetune must be >= 0 steps, got {finetune}.")
  if finetune:
    if local is None or train is None:
      raise ValueError("finetune > 0 needs local (the clients' LocalTraining) and train (their training data).")
    if train.num_clients != num_clients:
      raise ValueError(f"train has {train.num_clients} clients but test has {num_clients}.")
    if train.x is not test.x:
      model.check_inputs(train.x.shape[1:], train.x.dtype, "evaluate_per_client (train)")
    local = dataclasses.replace(local, epochs=None, steps=finetune, personal=None, hooks=None)
  else:
    local, train, trainable = None, test, None
  key = jax.random.PRNGKey(0) if key is None else key
  chunk = num_clients if chunk_size is None else max(1, min(chunk_size, num_clients))
  padded = math.ceil(num_clients / chunk) * chunk
  ids = np.arange(num_clients)
  te, tr = test.cohort(ids, pad_clients_to=padded), train.cohort(ids, pad_clients_to=padded)
  b = eval_batch_size(test.pad_size, batch_size)
  nb = math.ceil(test.pad_size / b)
  test_idx = jnp.pad(te.indices, ((0, 0), (0, nb * b - te.indices.shape[1])))
  sums = _per_client(params, model_state, train.x, train.y, tr.indices, tr.num_examples, test.x, test.y, test_idx,
                     te.num_examples, te.client_ids, key, model=model, local=local, trainable=trainable, batch=b,
                     num_batches=nb, chunk=chunk, stacked_params=stacked_params, stacked_state=stacked_state,
                     objective=objective)
  sums = {k: np.asarray(v[:num_clients], np.float64) for k, v in sums.items()}
  if all(v.ndim == 1 for v in sums.values()):  # scalar sums: one vectorised summary over the clients
    metrics = {k: np.asarray(v, np.float64) for k, v in objective.summarize(sums).items()}
  else:  # vector sums (R^2's per output, per-class metrics): client by client
    per = [objective.summarize({k: (float(v[c]) if v.ndim == 1 else v[c]) for k, v in sums.items()})
           for c in range(num_clients)]
    metrics = {k: np.stack([np.asarray(p[k], np.float64) for p in per]) for k in per[0]}  # [C] or [C, k]
  names = sorted(metrics, key=lambda k: (k != "accuracy", k != "loss", k))  # accuracy, loss, then the others
  metrics = {k: metrics[k] for k in names}
  n = (sums["count"] if isinstance(objective, Classification) else test.client_sizes).astype(np.int64)
  weights = sums["count"]
  return {**metrics, "num_examples": n,
          "summary": {**{k: client_summary(v, weights) for k, v in metrics.items() if v.ndim == 1},
                      "num_clients": int((n > 0).sum())}}
