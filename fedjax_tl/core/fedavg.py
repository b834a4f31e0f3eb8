"""FedAvg with a server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"), as init + apply.

``apply`` trains the cohort (any :class:`Schedule`), lets the aggregator (:mod:`fedjax_tl.aggregators`;
default: the mean weighted by the clients' numbers of examples, McMahan et al. 2017) turn the client deltas
into one mean update and feeds its negation to an optax server optimizer; plain FedAvg is ``optax.sgd(1.0)``.
Only the trainable part of the params is trained and communicated; the frozen part is fixed for the whole run,
and ``local_params`` stay with each client. Everything kept per client lives in the state as one stacked pytree
(:mod:`fedjax_tl.core.store`), so a checkpoint holds it without naming it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import keys
from fedjax_tl.aggregators.base import (
  Aggregator,
  Mean,
  Message,
  RoundInfo,
  covers_model_state,
  reducer_of,
  takes_message,
)
from fedjax_tl.core import multiprocess, store
from fedjax_tl.core.checks import (
  check_hashable,
  check_hook_output,
  check_model_params,
  check_optimizer,
  check_server_update,
  format_diff,
  leaf_shapes,
  round_input,
  tree_diff,
)
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.execution import (  # noqa: F401 (client_mesh, sample_clients: re-exported)
  ClientPostprocess,
  CohortRunner,
  RoundSums,
  Schedule,
  client_mesh,
  default_schedule,
  sample_clients,
)
from fedjax_tl.core.hooks import Hooks, ServerView, TrainContext
from fedjax_tl.core.params import split_params
from fedjax_tl.core.postprocess import ClientEncode
from fedjax_tl.core.state import ServerState, server_view
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.objectives import Classification
from fedjax_tl.transforms.base import UpdateTransform, encoded_bits, is_stateless
from fedjax_tl.tree import tree_bits
from fedjax_tl.types import ModelState, Params, PRNGKey, pseudo_gradient

__all__ = ["FedAvg", "ServerState", "sample_clients", "client_mesh", "MODEL_STATE_MODES"]

MODEL_STATE_MODES = ("average", "frozen", "local")


_PLAIN_SERVER = optax.sgd(1.0)  # one object, so that FedAvg(local) == FedAvg(local) (and they share programs)


@dataclasses.dataclass(frozen=True)
class FedAvg:
  """Federated averaging.

  A frozen, hashable configuration: every jitted piece takes it as a static argument, so two equal FedAvg
  instances share their traced and compiled programs.

  Attributes:
    local: local training (model, client optimizer, batch size, epochs/steps).
    server_optimizer: optax optimizer applied to the pseudo-gradient (default SGD(1.0) = plain FedAvg).
    schedule: execution schedule or its text form; "auto" picks the measured default for the backend;
      "chunked:auto" sizes the chunks from XLA's memory analysis to fit the schedule's ``memory_budget`` bytes
      (default: half the device's free memory, or a quarter of the host's RAM on CPU). The schedule owns the
      backend choices (:class:`Schedule`: mesh, memory budget, CPU rewrite, target platform); ``mesh`` and
      ``memory_budget`` here are their older spellings, folded into it.
    trainable: regex of trainable param paths (None: all); the rest is frozen and never communicated.
    local_params: regex of trainable params that every client keeps for itself: trained locally, never sent
      nor averaged, stored per client of the population in ``ServerState.client_params`` (FedPer, Arivazhagan
      et al. 2019, with ``"^head/"``: a personal head over a shared body). Needs ``num_clients`` in init.
    model_state: how non-param collections (BatchNorm statistics) are treated:
      "average" - clients normalise with batch statistics and update the running statistics; the server
        takes their weighted mean (sent up and down like params);
      "frozen" - clients normalise with the given (e.g. pretrained) running statistics, in inference mode,
        and never change them; nothing is sent;
      "local" - FedBN-style (Li et al. 2021): every client keeps its own running statistics across rounds
        (stored for the whole population in ``ServerState.client_states``); they are never sent. The server
        keeps the weighted mean of the latest cohort's statistics for evaluating the global model. BN scale
        and bias are still averaged (they are params).
    aggregator: how the clients' updates become the server's mean update (:mod:`fedjax_tl.aggregators`):
      ``Mean()`` (weighted by examples, FedAvg; the default), ``UniformMean()``, ``DPFedAvg``,
      ``AdaptiveClipping``, ``SecureAggregation``. Its state lives in ``ServerState.aggregator_state``.
    postprocess: optional ``(output, carry, ClientContext) -> (output, carry)`` applied to every client's
      output before aggregation, instead of client_transform and the aggregator's encoding.
    client_transform: an :class:`~fedjax_tl.transforms.UpdateTransform` applied to every client's delta
      before the aggregator encodes it (vmapped, each client with its own key), e.g. ``clip_l2`` or a
      compressor. Its state (e.g. error-feedback residuals) is kept for every client of the population in
      ``ServerState.transform_states`` (memory: population x state size) and checkpointed with the rest; a
      client without examples leaves its state unchanged. Its ``encoded_bits`` is the uplink size.
    server_transform: a transform applied to the mean delta (keyed by the round), e.g. Gaussian noise; its
      state lives in ``ServerState.server_transform_state``. ``transforms.dp_fedavg`` returns both halves of
      DP-FedAvg as transforms (use with ``UniformMean()``).
    downlink: a stateless compressor applied to the broadcast model (e.g. ``compression.int8()``): clients
      train from the decoded broadcast and send their delta relative to it; the server keeps its model in
      full precision (Caldas et al. 2018). Its ``encoded_bits`` is the downlink size.
    mesh: (the schedule's, ``schedule.on(mesh)``; this field is its older spelling) optional
      ``jax.sharding.Mesh`` with an axis "clients": each chunk's clients are split across its
      devices (one-program schedules, e.g. "vmap" or "chunked:K" with K a multiple of the device count).
      See :func:`client_mesh`.
    hooks: the algorithm's extension points (:class:`~fedjax_tl.Hooks`): its server state, what it broadcasts,
      a gradient hook per local step, what each client sends besides its delta, a per-client persistent state
      (in ``ServerState.algorithm_clients``; needs ``num_clients`` in init) and a server step before the server
      optimizer. SCAFFOLD, FedDyn and FedNova are hooks (:mod:`fedjax_tl.algorithms`). Their messages go
      through the aggregator with the delta (a :class:`~fedjax_tl.aggregators.Message`): DPFedAvg clips and
      noises them jointly, SecureAggregation masks them; aggregators that do not declare ``takes_message``
      (DP-FTRL) refuse them.
  """

  local: LocalTraining
  server_optimizer: optax.GradientTransformation = _PLAIN_SERVER
  schedule: Schedule | str = "auto"
  trainable: str | None = None
  model_state: str = "average"
  postprocess: ClientPostprocess | None = None
  mesh: jax.sharding.Mesh | None = None
  client_transform: UpdateTransform | None = None
  server_transform: UpdateTransform | None = None
  downlink: UpdateTransform | None = None
  memory_budget: int | None = None
  aggregator: Aggregator = Mean()
  local_params: str | None = None
  hooks: Hooks | None = None

  def __post_init__(self):
    check_optimizer(self.server_optimizer, "FedAvg's server_optimizer",
                    "optax.sgd(1.0) (plain FedAvg) or ftl.fed_adam(eta=1e-2)")
    if self.postprocess is not None and (self.client_transform is not None or self.aggregator != Mean()):
      raise ValueError("Give either postprocess or client_transform/aggregator, not both.")
    if self.downlink is not None and self.downlink.encoded_bits is None:
      raise ValueError("downlink must be a compressor (a transform with encoded_bits), e.g. compression.int8().")
    if isinstance(self.schedule, str):
      spec = self.schedule.strip()
      object.__setattr__(self, "schedule", default_schedule(local=self.local) if spec == "auto" else
                         Schedule.parse(spec))
    if self.mesh is not None or self.memory_budget is not None:  # the schedule owns them (older spellings)
      sched = self.schedule if self.mesh is None or self.schedule.mesh is not None else self.schedule.on(self.mesh)
      if self.memory_budget is not None:
        sched = dataclasses.replace(sched, memory_budget=self.memory_budget)
      object.__setattr__(self, "schedule", sched)
    if self.model_state not in MODEL_STATE_MODES:
      raise ValueError(f"model_state must be one of {MODEL_STATE_MODES}, got {self.model_state!r}.")
    if self.model_state == "frozen":
      object.__setattr__(self, "local", dataclasses.replace(self.local, norm_stats="frozen"))
    if self.local_params is not None:
      object.__setattr__(self, "local", dataclasses.replace(self.local, personal=self.local_params))
    if self.hooks is not None:
      if not isinstance(self.hooks, Hooks):
        raise TypeError(f"hooks must be a fedjax_tl.Hooks (subclass) instance, got {type(self.hooks).__name__}.")
      check_hashable(self.hooks, "FedAvg(hooks=...)")
      object.__setattr__(self, "local", dataclasses.replace(self.local, hooks=self.hooks))
    # Not fields: the runner per pad size (their compiled programs are shared by equal configurations) and the
    # model's number of outputs (for the label check).
    object.__setattr__(self, "_runners", {})
    object.__setattr__(self, "_num_outputs", None)

  def runner(self, pad_size: int) -> CohortRunner:
    if pad_size not in self._runners:
      self._runners[pad_size] = self.make_runner(pad_size)
    return self._runners[pad_size]

  def make_runner(self, pad_size: int, *, local: LocalTraining | None = None, schedule: Schedule | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> CohortRunner:
    """A runner of this configuration's round (its client postprocessing, per-client rows and the aggregator's
    reducer), optionally with another local training (e.g. without the CPU rewrite), schedule or mesh: what
    :func:`fedjax_tl.plan.plan_round` compiles for a target."""
    post = self.postprocess
    if post is None and (self.client_transform is not None or self.aggregator != Mean()):
      post = ClientEncode(self.client_transform, self.aggregator,  # (plain FedAvg's encoding is identity)
                                self._stats_in_message())
    return CohortRunner(self.local if local is None else local, self.schedule if schedule is None else schedule,
                        pad_size, post, row_parts=self._row_parts(), mesh=mesh,
                        reducer=reducer_of(self.aggregator))

  def round_inputs(self, params: Params, model_state: ModelState, cohort_size: int) -> tuple:
    """(server state, the cohort's own rows, its hooks' contexts, its client-transform carry) for a cohort of
    ``cohort_size`` clients, as the round builds them; trace it abstractly (``jax.eval_shape``) to plan a round."""
    state = self.init(params, model_state, num_clients=cohort_size)
    ids = jnp.arange(cohort_size)
    row = store.gather(state.clients, ids, cohort_size, "client rows")
    own, contexts = self._cohort_inputs(state, row, ids)
    return state, own, contexts, None if row is None else row.get("uplink")

  def prefetch(self, data: FederatedData, client_ids: np.ndarray, reported: np.ndarray | None = None) -> None:
    """Starts moving a coming round's cohort to the device (host-resident data with a ``prefetch`` method), as
    :meth:`apply` will build it, so that the transfer overlaps the current round; ``run_rounds`` calls it."""
    runner = self.runner(data.pad_size)
    if not hasattr(data, "prefetch") or runner.schedule.chunk_size == -1:
      return
    ids = np.asarray(client_ids)
    kept = ids if reported is None else ids[np.asarray(reported, bool)]
    data.prefetch(data.cohort(kept, pad_clients_to=runner.padded_cohort_size(len(ids))))

  def _stats_in_message(self) -> bool:
    """Whether the averaged model state (BatchNorm statistics) goes through the aggregator inside the message's
    mean part: for an aggregator that averaged statistics beside it would defeat (``covers_model_state`` False:
    secure aggregation masks them with the delta) and that encodes a Message. Other aggregators average them beside
    the delta, as before (their numerics are unchanged)."""
    return (self.model_state == "average" and self.postprocess is None and not covers_model_state(self.aggregator)
            and takes_message(self.aggregator))

  # ---- state ----
  def init(self, params: Params, model_state: ModelState | None = None,
           num_clients: int | None = None, client_store: str = "device") -> ServerState:
    """Server state from initial params; ``num_clients`` (the population size) is needed for "local".

    ``client_store``: where the rows every client keeps (``ServerState.clients``) live: "device" (default),
    "host" (numpy in RAM) or "disk:/path" (np.memmap files): a :class:`~fedjax_tl.core.store.HostStore`, whose
    rounds move only the cohort's rows to the device (populations of 10^6 clients).

    ``params`` and ``model_state`` must be those of the LocalTraining's model (``model.init``, or weights loaded
    into them with :func:`fedjax_tl.pretrained.merge`): their paths and shapes are checked against an abstract
    trace of ``model.init``."""
    check_model_params(self.local.model, params, model_state)
    trainable, frozen = split_params(params, self.trainable)
    row, keeps = {}, []  # one client's row: what every client keeps across rounds (stored for the population)
    if self.local_params is not None:
      row["params"], trainable = split_params(trainable, self.local_params)
      keeps.append("local_params are kept per client")
    if self.downlink is not None and not is_stateless(self.downlink, trainable):
      raise ValueError("downlink must be stateless (every client decodes the broadcast on its own).")
    model_state = model_state or {}
    if (not covers_model_state(self.aggregator) and not self._stats_in_message() and self.model_state == "average"
        and jax.tree.leaves(model_state)):
      raise ValueError(f'{type(self.aggregator).__name__} covers the params only (it encodes no Message, see '
                       'fedjax_tl.aggregators.takes_message); with model_state="average" the BatchNorm statistics '
                       'would be sent in the clear. Use model_state="frozen" or "local".')
    server_transform_state = None
    t = self.client_transform
    if t is not None and not is_stateless(t, trainable):
      row["uplink"] = t.init(trainable)
      keeps.append("client_transform keeps a state per client (e.g. error feedback)")
    if self.server_transform is not None and not is_stateless(self.server_transform, trainable):
      server_transform_state = self.server_transform.init(trainable)
    if self.model_state == "local":
      row["model_state"] = model_state
      keeps.append('model_state="local" keeps a state per client')
    algorithm_state = None
    if self.hooks is not None:
      algorithm_state = self.hooks.server_init(trainable)
      one = self.hooks.client_init(trainable)
      if jax.tree.leaves(one):
        row["algorithm"] = one
        keeps.append(f"{type(self.hooks).__name__} keeps a state per client")
    if row and not num_clients:
      raise ValueError(f"{'; '.join(keeps)}: pass num_clients to init().")
    state = ServerState(trainable, frozen, model_state, self.server_optimizer.init(trainable),
                        jnp.zeros((), jnp.int32), store.population(row, num_clients, client_store) if row else None,
                        server_transform_state, self.aggregator.init(trainable), algorithm_state)
    if self.hooks is not None and jax.tree.leaves(self._message_shape(state)) and (
        self.postprocess is not None or not takes_message(self.aggregator)):
      what = "postprocess" if self.postprocess is not None else type(self.aggregator).__name__
      raise ValueError(f"{type(self.hooks).__name__} sends a message besides the delta, which {what} would not "
                       "encode (it does not declare takes_message = True: an aggregator that does encodes a "
                       "fedjax_tl.aggregators.Message, delta and message together). Use an aggregator that does "
                       "(Mean, DPFedAvg, AdaptiveClipping, SecureAggregation).")
    return state

  def _one_client_state(self, state: ServerState) -> Any:
    if state.algorithm_clients is None:
      return self.hooks.client_init(state.params)
    return jax.tree.map(lambda a: a[0], state.algorithm_clients)

  def _message_shape(self, state: ServerState) -> Any:
    """The shapes of what one client's hooks send besides the delta (None if nothing)."""
    h = self.hooks

    def message(view, algorithm_state, client_state):
      params = view.params
      ctx = TrainContext(params, h.broadcast_from(algorithm_state, view), client_state, jnp.int32(0), jnp.int32(0),
                         jnp.int32(1), jnp.int32(0) if h.chooses_start else None)
      out = check_hook_output(h, "finish", h.finish(params, params, h.start(ctx), ctx, jnp.int32(1)), delta=params,
                              client_state=client_state)
      return out[1]

    return jax.eval_shape(message, server_view(state), state.algorithm_state, self._one_client_state(state))

  def _check_data(self, data: FederatedData) -> None:
    """Raises if ``data``'s examples do not fit the model's ``sample_shape`` (:meth:`Model.check_inputs`), or if
    its targets are not what the objective trains on (for classification: labels the model has no logit for would
    give NaN losses, reported later as a diverged model). Labels are checked against the data's own ``num_classes``
    when it is built; other targets here, once per dataset."""
    self.local.model.check_inputs(data.x.shape[1:], data.x.dtype, "FedAvg round (run_rounds / FedAvg.apply)")
    if self._num_outputs is None:
      object.__setattr__(self, "_num_outputs", self.local.model.num_outputs())
    k, objective = self._num_outputs, self.local.objective
    if isinstance(objective, Classification) and data.label_range is not None:
      top = data.label_range[1]
      if top >= k:
        raise ValueError(f"The data has labels up to {top} (num_classes={data.num_classes}) but the model has {k} "
                         f"outputs: labels >= {k} have no logit and give NaN losses. Build the model with "
                         f"num_classes={max(data.num_classes, top + 1)} outputs, or remap the labels to 0..{k - 1}.")
      if k < 2:
        objective.check(data.y, k, "labels")
      return
    checked = self.__dict__.setdefault("_targets_checked", set())
    if id(data.y) not in checked:
      objective.check(np.asarray(data.y), k, f"the data's targets (the model has {k} outputs)")
      checked.add(id(data.y))

  def _metric_names(self, data: FederatedData) -> tuple[str, ...]:
    """The objective's metric names (its summary of the clients' sums; "loss" first), once per target shape."""
    key = (data.y.shape[1:], str(data.y.dtype))
    cache = self.__dict__.setdefault("_metric_names_cache", {})
    if key not in cache:
      names = jax.eval_shape(lambda: self.local.objective.summarize(self.local.zero_stats(data.y)))
      cache[key] = tuple(sorted((k for k, v in names.items() if v.shape == ()), key=lambda k: k != "loss"))
    return cache[key]

  def communication_bits(self, state: ServerState) -> tuple[int, int]:
    """(bits down, bits up) per client per round, exact: the trainable params as encoded by ``downlink`` /
    ``client_transform`` or the aggregator's encoding (dense float32 without one), plus the averaged model
    state."""
    extra = tree_bits(state.model_state) if self.model_state == "average" else 0
    down = encoded_bits(self.downlink, state.params) + extra
    up = self.aggregator.bits(state.params)
    if up is None:
      up = encoded_bits(self.client_transform, state.params)
    up += extra
    if self.hooks is not None:
      hook_down, hook_up = self._hook_bits(state)
      down, up = down + hook_down, up + hook_up
    return down, up

  def _hook_shapes(self, state: ServerState) -> tuple[int, Any]:
    """The hooks' broadcast bits and the shapes of one client's message, traced abstractly once per shape of the
    state (not every round)."""
    parts = (server_view(state), state.algorithm_state, state.algorithm_clients)
    key = (jax.tree.structure(parts), tuple((jnp.shape(x), str(jnp.result_type(x))) for x in jax.tree.leaves(parts)))
    cache = self.__dict__.setdefault("_hook_bits_cache", {})
    if key not in cache:
      h = self.hooks
      cache[key] = (h.broadcast_bits(jax.eval_shape(h.broadcast_from, state.algorithm_state, server_view(state))),
                    self._message_shape(state))
    return cache[key]

  def _hook_bits(self, state: ServerState) -> tuple[int, int]:
    """The hooks' broadcast and message bits."""
    down, message = self._hook_shapes(state)
    return down, self.hooks.message_bits(message)

  def communication_bytes(self, state: ServerState) -> tuple[int, int]:
    """(bytes down, bytes up) per client per round: the bits rounded up to whole bytes."""
    down, up = self.communication_bits(state)
    return -(-down // 8), -(-up // 8)

  # ---- server side (jitted with this configuration static) ----
  @functools.partial(jax.jit, static_argnums=0)
  def _broadcast(self, params: Params, key: PRNGKey) -> Params:
    return self.downlink.apply(params, self.downlink.init(params), key)[0]

  @functools.partial(jax.jit, static_argnums=0)
  def _hook_broadcast(self, algorithm_state: Any, view: ServerView) -> Any:
    return self.hooks.broadcast_from(algorithm_state, view)

  @functools.partial(jax.jit, static_argnums=(0, 5))
  def _server_update(self, state: ServerState, sums: RoundSums, key: PRNGKey,
                     real: jax.Array, num_clients: int) -> tuple[ServerState, dict]:
    mean_delta, agg_state, agg_metrics = self.aggregator.decode(
        sums.delta_sum, sums.weight_sum, state.aggregator_state, sums.client_metrics, real,
        keys.server(key, "aggregator"))
    message_sum, stats_mean = sums.message_sum, None
    if isinstance(mean_delta, Message):  # the hooks' message (and the statistics) came through the aggregator
      mean_delta, message_sum = mean_delta
      if self._stats_in_message() and jax.tree.leaves(state.model_state):
        mean_delta, stats_mean = mean_delta
    mean_delta = jax.tree.map(lambda d, p: d.astype(p.dtype), mean_delta, state.params)
    server_ts = state.server_transform_state
    if self.server_transform is not None:
      t = self.server_transform
      mean_delta, new_ts = t.apply(mean_delta, t.init(mean_delta) if server_ts is None else server_ts,
                                   keys.server(key, "server_transform"))
      server_ts = None if server_ts is None else new_ts
    algorithm_state = state.algorithm_state
    if self.hooks is not None:
      out = self.hooks.server_update_from(algorithm_state, mean_delta, message_sum, real.sum().astype(jnp.int32),
                                          jnp.int32(num_clients), sums.client_metrics, server_view(state))
      check_server_update(self.hooks, out, mean_delta, algorithm_state)
      mean_delta, algorithm_state = out
      mean_delta = jax.tree.map(lambda d, p: d.astype(p.dtype), mean_delta, state.params)
    updates, opt_state = self.server_optimizer.update(pseudo_gradient(mean_delta), state.opt_state,
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if stats_mean is not None:  # already the weighted mean (aggregators.base.mean_of)
      model_state = jax.tree.map(lambda s, m: s.astype(m.dtype), stats_mean, state.model_state)
    elif self.model_state in ("average", "local"):
      total = jnp.maximum(sums.weight_sum, 1e-12)
      model_state = jax.tree.map(lambda s, m: (s / total).astype(m.dtype), sums.state_sum, state.model_state)
    return state._replace(params=params, model_state=model_state, opt_state=opt_state, round=state.round + 1,
                          server_transform_state=server_ts, aggregator_state=agg_state,
                          algorithm_state=algorithm_state), agg_metrics

  def _check_message(self, state: ServerState, message_sum: Any) -> None:
    """Raises if the hooks' message in a round differs in structure or shapes from the one traced at init (to
    count its uplink bytes and check the aggregator); checked once per shape of the round's message."""
    got = (jax.tree.structure(message_sum), tuple(leaf_shapes(message_sum).items()))
    checked = self.__dict__.setdefault("_messages_checked", set())
    if got in checked:
      return
    want = self._hook_shapes(state)[1]
    diff = tree_diff(message_sum, want)
    if diff or jax.tree.structure(message_sum) != jax.tree.structure(want):
      name = type(self.hooks).__name__
      raise ValueError(f"{name}.finish sent a message in this round that differs from the one FedAvg traced for "
                       f"one client at init (to count its uplink bytes): {format_diff(diff) or 'its containers'}. "
                       "A message must have the same structure and shapes for every client and round (it is summed "
                       "over the cohort): build it from the shapes of finish's arguments only, not from Python state "
                       "or values that change between calls.")
    checked.add(got)

  def _row_parts(self) -> tuple[str, ...]:
    """The parts of a client's row that local training reads and writes (all but the client transform's)."""
    return tuple(part for part, used in (("model_state", self.model_state == "local"),
                                         ("params", self.local_params is not None),
                                         ("algorithm", self.hooks is not None)) if used)

  def _cohort_inputs(self, state: ServerState, row: Any, rows: jax.Array,
                     client_ids: jax.Array | None = None) -> tuple[Any, Any]:
    """What local training gets per client besides the broadcast, from the cohort's ``row`` (the gathered
    client rows): its own row (the parts "model_state" and "params", or None) and, with hooks, its
    :class:`TrainContext` ([C, ...] each)."""
    c = rows.shape[0]
    per_client = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (c, *jnp.shape(a))), tree)  # noqa: E731
    row = row or {}
    own = {part: row[part] for part in ("model_state", "params") if part in row} or None
    contexts = None
    if self.hooks is not None:
      sent = per_client(self._hook_broadcast(state.algorithm_state, server_view(state)))
      ids = rows if client_ids is None else client_ids
      contexts = TrainContext(None, sent, row.get("algorithm"), ids.astype(jnp.int32), per_client(state.round),
                              None, jnp.zeros((c,), jnp.int32) if self.hooks.chooses_start else None)
    return own, contexts

  def apply(self, state: ServerState, data: FederatedData, client_ids: np.ndarray, round_key: PRNGKey, *,
            reported: np.ndarray | None = None, step_budget: np.ndarray | None = None) -> tuple[ServerState, dict]:
    """One round: returns (new_state, metrics). Metrics are device scalars plus per-client arrays.

    Participation and work are inputs of the round (host arrays aligned with ``client_ids``):
    ``reported`` (bool) says which clients report: one that does not (a dropout) changes nothing -- not the
    aggregate, not the metrics, not its own row, not the byte count; the round equals the round of the reporting
    clients alone (with the same compiled program: the cohort keeps its padded size). If none reports, nothing
    changes but the round count. ``step_budget`` (int >= 0) caps each client's local steps (a straggler doing a
    quarter of its work): it runs its first ``min(its steps, budget)`` steps, as it would with that many steps.
    ``metrics["client_metrics"]`` stays aligned with ``client_ids``, with ``reported`` among them (a client
    that did not report shows zeros).

    The cohort's client rows (``state.clients``) are gathered once before local training and their new values
    scattered once after it, here and nowhere else."""
    self._check_data(data)
    sampled = np.asarray(client_ids)
    keep = round_input(reported, sampled, "reported", bool)
    budget = round_input(step_budget, sampled, "step_budget", int)
    if keep is not None:
      client_ids = sampled[keep]
      budget = None if budget is None else budget[keep]
    runner = self.runner(data.pad_size)
    if runner.schedule.chunk_size == -1:  # "chunked:auto": size the chunks for memory once
      first = jnp.zeros((1,), jnp.int32)
      own, contexts = self._cohort_inputs(state, store.gather(state.clients, first, data.num_clients, "client rows"),
                                          first)
      runner = self._runners[data.pad_size] = runner.resolve(state.params, state.frozen, state.model_state, data.x,
                                                             data.y, len(sampled), None, own,
                                                             contexts)
    n = len(client_ids)
    padded = runner.padded_cohort_size(len(sampled))  # the sampled cohort's program, whoever reports
    # [multi-process] this process's part of the cohort (None in one process without process-local data)
    split = multiprocess.split_cohort(data, client_ids, padded, runner, round_key, sampled)
    cohort = data.cohort(client_ids, pad_clients_to=padded) if split is None else split.cohort
    rows, ids = jnp.maximum(cohort.client_ids, 0), jnp.asarray(client_ids)
    row = store.gather(state.clients, rows, data.num_clients, "client rows")  # the cohort's rows: [C, ...]
    own, contexts = self._cohort_inputs(state, row, rows, cohort.client_ids)
    carry = None if row is None else row.get("uplink")
    params = state.params
    if self.downlink is not None:  # what the clients receive and train from
      params = self._broadcast(state.params, keys.server(round_key, "downlink"))
    budgets = None
    if budget is not None:
      budgets = np.zeros(padded, np.int32)
      budgets[:n] = np.minimum(budget, np.iinfo(np.int32).max)
      budgets = jnp.asarray(budgets) if split is None else split.local(budgets)  # [multi-process] this part's
    agg = self.aggregator
    shared, host = agg.setup(state.aggregator_state, n, cohort.size if split is None else split.setup_padded,
                             float(data.pad_size), round_key)
    sums = runner(params, state.frozen, state.model_state, *data.round_arrays(cohort), round_key, carry,
                  (state.aggregator_state, shared), own, contexts, budgets,
                  positions=None if split is None else split.positions)
    if split is not None:  # [multi-process] the whole cohort's sums and per-client outputs, on every process
      sums, cohort, carry = split.combine(sums, carry)
    if self.hooks is not None:
      self._check_message(state, sums.delta_sum.sum if isinstance(sums.delta_sum, Message) else sums.message_sum)
    total, weight_sum, info = agg.aggregate(sums.delta_sum, sums.weight_sum, shared, host)
    info = RoundInfo.of(total, info)
    if info.aborted or n == 0:  # the aggregator aborted the round, or nobody reported: nothing changes but the count
      new_state, agg_metrics = state._replace(round=state.round + 1), {}
      sums = sums._replace(client_carry=carry)
    else:
      real = (cohort.client_ids >= 0).astype(jnp.float32)
      new_state, agg_metrics = self._server_update(state, sums._replace(delta_sum=total, weight_sum=weight_sum),
                                                   round_key, real, data.num_clients)
    if state.clients is not None and n:  # the cohort's new rows, written back at once
      new_rows = {**(sums.client_rows or {}), "uplink": sums.client_carry}
      new_state = new_state._replace(clients=store.scatter(state.clients, ids,
                                                           {part: new_rows[part] for part in state.clients}))
    cm = sums.client_metrics
    w = cm["num_examples"]
    down, up = self.communication_bytes(state)
    client_metrics = {k: v[:n] for k, v in cm.items()}
    if keep is not None:  # aligned with the sampled cohort again: zeros for the clients that did not report
      where = jnp.asarray(np.flatnonzero(keep))
      client_metrics = {k: jnp.zeros((len(sampled), *v.shape[1:]), v.dtype).at[where].set(v)
                        for k, v in client_metrics.items()}
      client_metrics["reported"] = jnp.asarray(keep)
    train = {f"train_{k}": (cm[k] * w).sum() / jnp.maximum(w.sum(), 1.0) for k in self._metric_names(data)}
    metrics = {
        **info.metrics,
        **agg_metrics,
        **train,
        "num_examples": w.sum(),
        "bytes_down": down * n,
        "bytes_up": up * (n if info.senders is None else info.senders),
        "client_metrics": client_metrics,
    }
    return new_state, metrics


