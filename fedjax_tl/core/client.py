"""Local client training as pure, vmappable pieces: ``init``, ``step`` (one optimizer step), ``finish``.

Splitting one client's training into per-step pieces lets the execution layer choose how steps are looped
(``lax.scan`` in one program, or a host loop over jitted blocks of unrolled steps, which is much faster for
convolutions on XLA:CPU) and how clients are batched (vmap, chunks, sequential) without changing the maths.

Batching. A client with ``n`` examples runs ``ceil(n / B)`` steps per epoch over a fresh permutation of its
own examples; the permutation key is ``fold_in(client_key, epoch)`` where ``client_key`` derives from the
experiment seed, the round and the client id. All clients share the static step count of the population's
largest client; a client's steps past its own count are inactive: they leave params, optimizer state, model
state and metrics untouched (``jnp.where``), so padding never touches gradients, losses or counts. Within an
active step, padded rows of a partial last batch are masked out of the loss (the loss is the mean over real
examples) and out of normalisation statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import keys
from fedjax_tl.core.checks import check_hook_output, check_optimizer
from fedjax_tl.core.hooks import Hooks, LossBatch, TrainContext
from fedjax_tl.core.params import split_params
from fedjax_tl.models.base import Model, logits_of
from fedjax_tl.models.fast import fast_cpu
from fedjax_tl.objectives import Classification, Objective, masked_cross_entropy
from fedjax_tl.types import ModelState, OptState, Params, PRNGKey, Updates

__all__ = ["LocalTraining", "client_optimizer", "OPTIMIZERS", "ClientState", "ClientOutput", "merge_params",
           "masked_cross_entropy"]


class ClientState(NamedTuple):
  params: Params  # trainable params only
  opt_state: OptState
  model_state: ModelState
  key: PRNGKey
  num_examples: jax.Array  # int32 scalar
  stats: dict  # the objective's sums over the examples seen (with repetition over epochs): "loss", "count", ...
  steps: jax.Array = None  # int32 scalar: local steps taken (active steps only)
  hook: Any = None  # (TrainContext, the hooks' local-training state) when the algorithm has hooks
  budget: jax.Array = None  # int32 scalar: the round's step budget for this client (a straggler), None: no limit


class ClientOutput(NamedTuple):
  delta: Updates  # client params - server params (trainable part)
  model_state: ModelState  # the client's final model state (e.g. batch_stats)
  num_examples: jax.Array  # float32 scalar, the aggregation weight
  metrics: dict[str, jax.Array]  # scalars: loss, accuracy, num_examples
  message: Any = None  # what the algorithm's hooks send besides the delta (averaged like it), None if nothing
  # The client's new row (what it keeps across rounds, ServerState.clients): "model_state" (its final model
  # state), "params" (its own params, with ``personal``), "algorithm" (its hooks' new persistent state, with hooks).
  row: Any = None


def merge_params(trainable: Params, frozen: Params) -> Params:
  """Recombines the trainable and frozen parts (disjoint nested dicts) into one params tree."""
  if not frozen:
    return trainable
  if not trainable:
    return frozen
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge_params(v, out[k]) if isinstance(v, dict) and k in out else v
  return out


@dataclasses.dataclass(frozen=True)
class LocalTraining:
  """Local training of one client with any optax optimizer.

  Attributes:
    model: the model (apply with ``train=True`` and a padding mask).
    optimizer: the client optimizer, initialised fresh every round (as in FedAvg).
    batch_size: local batch size B.
    epochs: local epochs E (default 1 when ``steps`` is not given).
    steps: fixed number of local steps S instead of epochs; a client cycles through reshuffled epochs of its
      own data until S steps are done.
    augment: optional ``(key, x_batch) -> x_batch`` applied on device before the model's preprocessing.
    norm_stats: "batch": normalisation layers use batch statistics and update their running statistics
      (training mode); "frozen": they use the running statistics they were given and leave them unchanged
      (inference mode, as a Keras BatchNormalization with trainable=False).
    personal: regex of params that are the client's own (set by ``FedAvg(local_params=...)``): ``init`` takes
      them from the client's row (``row["params"]``, its stored copy) and trains them with the rest; ``finish``
      returns them in its new row (``ClientOutput.row["params"]``) and leaves them out of the delta, so they are
      never sent.
    hooks: the algorithm's client-side hooks (set by ``FedAvg(hooks=...)``, :class:`~fedjax_tl.Hooks`): ``init``
      takes the client's :class:`~fedjax_tl.TrainContext` (``ctx``), ``step`` lets them change the gradient,
      ``finish`` lets them change the delta, add a message and return the client's new persistent state
      (``ClientOutput.row["algorithm"]``).
    fast_path: on CPU, train the model through :func:`fedjax_tl.models.fast.fast_cpu` (its convolutions as
      matrix products, its non-overlapping max pools as reshape-max, with hand-written gradients: the same
      function, up to float rounding, 2-3x faster for a plain ``nn.Conv`` CNN on XLA:CPU). False trains the
      model's program as XLA lowers it. Ignored on GPU/TPU, where XLA's convolutions are the fast path: a round's
      :class:`~fedjax_tl.Schedule` resolves it against its target platform (``Schedule.resolve_local``), not the
      process's default backend.
    objective: what the local steps minimise and the clients report (:mod:`fedjax_tl.objectives`): softmax
      cross-entropy on integer labels by default; ``regression()``, ``multilabel()``, ``next_token()`` or any
      ``from_loss(fn)``.
  """

  model: Model
  optimizer: optax.GradientTransformation
  batch_size: int
  epochs: int | None = None
  steps: int | None = None
  augment: Callable[[PRNGKey, jax.Array], jax.Array] | None = None
  norm_stats: str = "batch"
  personal: str | None = None
  hooks: Hooks | None = None
  fast_path: bool = True
  objective: Objective = Classification()

  def __post_init__(self):
    if not isinstance(self.objective, Objective):
      raise TypeError(f"LocalTraining's objective must be a fedjax_tl.objectives.Objective (e.g. "
                      f"ftl.objectives.regression()), got {type(self.objective).__name__}.")
    check_optimizer(self.optimizer, "LocalTraining's optimizer", "optax.sgd(0.1) or ftl.client_optimizer('adam', 1e-3)")
    if self.norm_stats not in ("batch", "frozen"):
      raise ValueError(f"norm_stats must be 'batch' or 'frozen', got {self.norm_stats!r}.")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
    if self.epochs is None and self.steps is None:
      object.__setattr__(self, "epochs", 1)
    if self.epochs is not None and self.steps is not None:
      raise ValueError(f"Give epochs or steps for local training, not both (got {self.epochs}, {self.steps}).")
    if (self.epochs is not None and self.epochs < 1) or (self.steps is not None and self.steps < 1):
      raise ValueError(f"epochs/steps must be >= 1, got epochs={self.epochs}, steps={self.steps}.")

  @property
  def train_model(self) -> Model:
    """The model as the local steps run it: :func:`~fedjax_tl.models.fast.fast_cpu` of ``model`` on CPU with
    ``fast_path``, else ``model``."""
    if self.fast_path and jax.default_backend() == "cpu":
      return fast_cpu(self.model)
    return self.model

  # ---- static step counts (host side) ----
  def num_steps(self, pad_size: int) -> int:
    """Static number of steps every client is run for (its inactive tail is masked)."""
    if self.steps is not None:
      return self.steps
    return self.epochs * max(math.ceil(pad_size / self.batch_size), 1)

  def active_steps(self, num_examples: np.ndarray) -> np.ndarray:
    """Per-client number of steps that change anything (host numpy)."""
    n = np.asarray(num_examples)
    if self.steps is not None:
      return np.where(n > 0, self.steps, 0)
    return self.epochs * -(-n // self.batch_size)

  # ---- pure pieces (traced) ----
  def init(self, params: Params, model_state: ModelState, key: PRNGKey, num_examples: jax.Array,
           row: Any = None, ctx: TrainContext | None = None, step_budget: jax.Array | None = None,
           targets: Any = None) -> ClientState:
    """The client's training state from the broadcast ``params`` and ``model_state``, and from its own ``row``
    (a dict of what it keeps across rounds, or None): ``row["model_state"]`` replaces the broadcast model state
    (FedBN's own statistics), ``row["params"]`` joins the params (``personal``). ``ctx`` is the hooks'
    :class:`~fedjax_tl.TrainContext` for this client (needed with hooks). ``step_budget`` (int32 scalar, or None)
    caps the client's local steps this round (a straggler): it runs its first ``min(own steps, step_budget)``
    steps, exactly as it would with that many steps. ``targets`` (the dataset's targets, or their shape and
    dtype) gives the objective's sums their shapes (needed for objectives whose sums depend on the targets' shape,
    e.g. multi-output regression; the runner passes them)."""
    hook = None
    row = row or {}
    if "model_state" in row:
      model_state = row["model_state"]
    if self.hooks is not None:  # the context sees what the client received (its own params excluded)
      ctx = ctx._replace(global_params=params, num_examples=jnp.asarray(num_examples, jnp.int32))
      hook = (ctx, self.hooks.start(ctx))
    if self.personal is not None:  # the client's own params join the broadcast ones
      params = merge_params(params, row["params"])
    budget = None if step_budget is None else jnp.asarray(step_budget, jnp.int32)
    return ClientState(params, self.optimizer.init(params), model_state, key, jnp.asarray(num_examples, jnp.int32),
                       self.zero_stats(targets), jnp.zeros((), jnp.int32), hook, budget)

  def zero_stats(self, targets: Any = None) -> dict:
    """The objective's sums before any example, shaped for ``targets`` (all targets ``[N, ...]``; default one
    label per example)."""
    shape = () if targets is None else tuple(targets.shape[1:])
    dtype = self.objective.target_dtype if targets is None else targets.dtype
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in stats_shapes(self.objective, shape, str(jnp.dtype(dtype)),
                                                                         self.model).items()}

  @property
  def chooses_start(self) -> bool:
    """Whether the hooks offer several starting models (:meth:`choose` must run after :meth:`init`)."""
    return self.hooks is not None and self.hooks.chooses_start

  def choose(self, state: ClientState, frozen: Params, x: jax.Array, y: jax.Array, indices: jax.Array) -> ClientState:
    """With hooks that offer starting :meth:`~fedjax_tl.Hooks.candidates`: the state started from the candidate
    with the lowest loss on the client's first local batch (the batch step 0 trains on; inference mode), its index
    in ``ctx.choice``, that model in ``ctx.global_params`` (the delta is taken against it)."""
    ctx, hook_state = state.hook
    cands = self.hooks.candidates(ctx)
    idx, mask, _ = self.batch(state, jnp.int32(0), indices)
    xb, yb = x[idx], y[idx]
    own = split_params(state.params, self.personal)[0] if self.personal is not None else {}

    def loss(p):
      out, _ = self.train_model.apply(merge_params(merge_params(p, own), frozen), state.model_state, xb,
                                      train=False, mask=mask)
      return self.objective.loss(logits_of(out), yb, mask)[0]

    j = jnp.argmin(jax.lax.map(loss, cands)).astype(jnp.int32)
    start = jax.tree.map(lambda c: c[j], cands)
    params = merge_params(start, own)
    ctx = ctx._replace(global_params=start, choice=j)
    return state._replace(params=params, opt_state=self.optimizer.init(params), hook=(ctx, hook_state))

  def batch(self, state: ClientState, t: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Example indices [B], row mask [B] and whether step ``t`` is active, for one client."""
    b = self.batch_size
    pad = indices.shape[0]
    n = state.num_examples
    steps_per_epoch = jnp.maximum((n + b - 1) // b, 1)
    epoch, within = t // steps_per_epoch, t % steps_per_epoch
    if self.steps is not None:
      active = (n > 0) & (t < self.steps)
    else:
      active = (n > 0) & (t < self.epochs * steps_per_epoch)
    if state.budget is not None:  # a straggler: only its first ``budget`` steps
      active = active & (t < state.budget)
    # A fresh permutation of the client's own examples every epoch: real slots sorted by a random key, padding
    # slots last.
    noise = jax.random.uniform(keys.epoch(state.key, epoch), (pad,))
    perm = jnp.argsort(jnp.where(jnp.arange(pad) < n, noise, 2.0))
    pos = within * b + jnp.arange(b)
    mask = (pos < n) & active
    return indices[perm[jnp.minimum(pos, pad - 1)]], mask, active

  def step(self, state: ClientState, t: jax.Array, frozen: Params, x: jax.Array, y: jax.Array,
           indices: jax.Array) -> ClientState:
    """One local step ``t`` for one client; ``x``/``y`` are the whole dataset, ``indices`` the client's row."""
    idx, mask, active = self.batch(state, t, indices)
    xb, yb = x[idx], y[idx]
    step_key = keys.step(state.key, t)
    aug_key, drop_key = jax.random.split(step_key)
    if self.augment is not None:
      xb = self.augment(aug_key, xb)

    loss_hook = self.hooks is not None and self.hooks.has_loss
    hook = state.hook

    def loss_fn(p):
      out, new_model_state = self.train_model.apply(merge_params(p, frozen), state.model_state, xb,
                                                    train=self.norm_stats == "batch", mask=mask, rng=drop_key)
      mean, stats = self.objective.loss(logits_of(out), yb, mask)
      hook_state = None
      if loss_hook:  # the algorithm's loss term: sees the outputs (features too), the batch and other models
        ctx, hook_state = hook
        other = lambda q: self.train_model.apply(merge_params(q, frozen), state.model_state, xb,  # noqa: E731
                                                 train=False, mask=mask)[0]
        objective = lambda o: self.objective.loss(logits_of(o), yb, mask)[0]  # noqa: E731
        res = self.hooks.loss(mean, LossBatch(out, yb, mask, other, objective), p, hook_state, ctx, t)
        if not isinstance(res, tuple | list) or len(res) != 2 or jnp.shape(res[0]) != ():
          raise TypeError(f"{type(self.hooks).__name__}.loss must return (a scalar loss, its local-training state), "
                          f"got {type(res).__name__}.")
        mean, hook_state = res
      return mean, (new_model_state, stats, hook_state)

    grads, (new_ms, stats, loss_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
    counted = active
    if self.hooks is not None:
      ctx, hook_state = hook
      if loss_hook:
        hook_state = loss_state
      out = self.hooks.grads(grads, state.params, hook_state, ctx, t)
      out = check_hook_output(self.hooks, "grads", out, grads=grads, state=hook_state)
      grads, new_hook_state = out[:2]
      hook = (ctx, keep(new_hook_state, state.hook[1]))  # an inactive step leaves it as it was
      if len(out) == 3:  # the hook skips this step: nothing changes (not even an optimizer's momentum) and the
        # step count the hooks see (FedNova's tau) does not count it
        counted = active & ~jnp.asarray(out[2], bool)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(counted, a, b), new, old)  # noqa: E731
    updates, new_opt = self.optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    return ClientState(
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        model_state=keep(new_ms, state.model_state),
        key=state.key,
        num_examples=state.num_examples,
        stats=jax.tree.map(jnp.add, state.stats, stats),
        steps=state.steps + counted.astype(jnp.int32),
        hook=hook,
        budget=state.budget,
    )

  def finish(self, state: ClientState, server_params: Params) -> ClientOutput:
    params, model_state = state.params, state.model_state
    row = {"model_state": model_state}
    if self.personal is not None:  # kept by the client, never sent
      row["params"], params = split_params(params, self.personal)
    if self.chooses_start:  # the delta is against the model the client started from
      server_params = state.hook[0].global_params
    delta = jax.tree.map(lambda c, s: (c - s).astype(s.dtype), params, server_params)
    message = None
    if self.hooks is not None:
      ctx, hook_state = state.hook
      out = self.hooks.finish(delta, params, hook_state, ctx, state.steps)
      out = check_hook_output(self.hooks, "finish", out, delta=delta, client_state=ctx.client_state)
      delta, message, row["algorithm"] = out[:3]
      hook_metrics = out[3] if len(out) == 4 else {}
    else:
      hook_metrics = {}
    n = state.num_examples.astype(jnp.float32)
    metrics = {**self.objective.summarize(state.stats), "num_examples": n}
    clash = sorted(set(hook_metrics) & set(metrics))
    if clash:
      raise ValueError(f"{type(self.hooks).__name__}.finish returned client metrics named {clash}, which local "
                       "training reports itself; give them other names.")
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in hook_metrics.items()})
    return ClientOutput(delta, model_state, n, metrics, message, row)


# Client optimizers by name (the experiments' --client_optimizer): name -> (learning rate -> optax optimizer).
OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam, "momentum": lambda lr: optax.sgd(lr, momentum=0.9)}


def client_optimizer(name: str, lr: float) -> optax.GradientTransformation:
  """The optax optimizer ``name`` (one of ``OPTIMIZERS``) with learning rate ``lr``."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown client optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.")
  return OPTIMIZERS[name](lr)


@functools.lru_cache(maxsize=256)
def stats_shapes(objective: Objective, target_shape: tuple, target_dtype: str, model: Model) -> dict:
  """The shapes of ``objective.stats`` for targets of one example's ``target_shape`` (abstract, cached)."""
  b = 1
  if type(objective) is Classification:  # scalars whatever the shapes
    return {k: jax.ShapeDtypeStruct((), jnp.float32) for k in ("loss", "correct", "count")}
  try:
    out = (b, *model.output_shape())
  except Exception:  # noqa: BLE001  a model that cannot be traced abstractly: one label's logits
    out = (b, 2)
  shapes = jax.eval_shape(objective.stats, jax.ShapeDtypeStruct(out, jnp.float32),
                          jax.ShapeDtypeStruct((b, *target_shape), jnp.dtype(target_dtype)),
                          jax.ShapeDtypeStruct((b,), jnp.bool_))
  return dict(shapes)
