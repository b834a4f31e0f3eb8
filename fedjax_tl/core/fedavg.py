"""FedAvg with a server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"), as init + apply.

``apply`` trains the cohort (any :class:`Schedule`), averages the client deltas weighted by their number of
examples (McMahan et al. 2017) and feeds the negated average to an optax server optimizer; plain FedAvg is
``optax.sgd(1.0)``. Only the trainable part of the params is trained and communicated; the frozen part is
fixed for the whole run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.core.client import ClientOutput, LocalTraining, merge_params
from fedjax_tl.core.execution import (
  ClientContext,
  ClientPostprocess,
  CohortRunner,
  RoundSums,
  Schedule,
  default_schedule,
)
from fedjax_tl.core.params import split_params, tree_bytes
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.transforms.adaptive_clip import AdaptiveClipping
from fedjax_tl.transforms.base import UpdateTransform, encoded_bits, is_stateless
from fedjax_tl.transforms.secure_agg import FIELD_BITS, SecureAggregation
from fedjax_tl.types import ModelState, Params, PRNGKey, pseudo_gradient

__all__ = ["FedAvg", "ServerState", "sample_clients", "client_mesh", "MODEL_STATE_MODES"]

MODEL_STATE_MODES = ("average", "frozen", "local")


class ServerState(NamedTuple):
  params: Params  # trainable part of the global model
  frozen: Params  # frozen part (never trained, never sent)
  model_state: ModelState  # e.g. batch_stats
  opt_state: optax.OptState  # server optimizer state
  round: jax.Array  # int32 scalar: rounds completed
  client_states: ModelState = None  # model_state="local": every client's own state, [num_clients, ...]
  transform_states: Any = None  # stateful client_transform: every client's own state, [num_clients, ...]
  server_transform_state: Any = None  # stateful server_transform's state
  clip_norm: jax.Array | None = None  # adaptive clipping: the clip norm for the next round

  def full_params(self) -> Params:
    return merge_params(self.params, self.frozen)


def client_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices; on a multi-host TPU pod after
  ``jax.distributed.initialize()``, all devices of all hosts) with the axis name "clients"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), ("clients",))


def sample_clients(key: PRNGKey, num_clients: int, cohort_size: int) -> np.ndarray:
  """``cohort_size`` distinct client ids, uniformly without replacement (host numpy array)."""
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, {num_clients}] (the number of clients), got {cohort_size}.")
  if cohort_size == num_clients:
    return np.arange(num_clients)
  return np.sort(np.asarray(jax.random.choice(key, num_clients, (cohort_size,), replace=False)))


@dataclasses.dataclass
class FedAvg:
  """Federated averaging.

  Attributes:
    local: local training (model, client optimizer, batch size, epochs/steps).
    server_optimizer: optax optimizer applied to the pseudo-gradient (default SGD(1.0) = plain FedAvg).
    schedule: execution schedule or its text form; "auto" picks the measured default for the backend;
      "chunked:auto" sizes the chunks from XLA's memory analysis to fit ``memory_budget`` bytes (default: half
      the device's free memory, or a quarter of the host's RAM on CPU).
    trainable: regex of trainable param paths (None: all); the rest is frozen and never communicated.
    model_state: how non-param collections (BatchNorm statistics) are treated:
      "average" - clients normalise with batch statistics and update the running statistics; the server
        takes their weighted mean (sent up and down like params);
      "frozen" - clients normalise with the given (e.g. pretrained) running statistics, in inference mode,
        and never change them; nothing is sent;
      "local" - FedBN-style (Li et al. 2021): every client keeps its own running statistics across rounds
        (stored for the whole population in ``ServerState.client_states``); they are never sent. The server
        keeps the weighted mean of the latest cohort's statistics for evaluating the global model. BN scale
        and bias are still averaged (they are params).
    postprocess: optional ``(output, carry, ClientContext) -> (output, carry)`` applied to every client's
      output before aggregation (replaces the built-in client_transform / weighting / secure aggregation).
    client_transform: an :class:`~fedjax_tl.transforms.UpdateTransform` applied to every client's delta
      before aggregation (vmapped, each client with its own key), e.g. ``clip_l2`` or a compressor. Its state
      (e.g. error-feedback residuals) is kept for every client of the population in
      ``ServerState.transform_states`` (memory: population x state size) and checkpointed with the rest; a
      client without examples leaves its state unchanged. Its ``encoded_bits`` is the uplink size.
    server_transform: a transform applied to the mean delta (keyed by the round), e.g. Gaussian noise; its
      state lives in ``ServerState.server_transform_state``. ``transforms.dp_fedavg`` returns both halves of
      DP-FedAvg.
    downlink: a stateless compressor applied to the broadcast model (e.g. ``compression.int8()``): clients
      train from the decoded broadcast and send their delta relative to it; the server keeps its model in
      full precision (Caldas et al. 2018). Its ``encoded_bits`` is the downlink size.
    secure_aggregation: a :class:`~fedjax_tl.transforms.secure_agg.SecureAggregation`: clients send masked
      field vectors of their weighted (transformed) deltas and the server only learns their sum, after
      recovering dropped clients' masks. Needs ``model_state`` "frozen" or "local" for models with state
      (averaged BN statistics would be sent in the clear).
    adaptive_clip: DP-FedAvg with adaptive clipping (:class:`~fedjax_tl.transforms.adaptive_clip.
      AdaptiveClipping`, Andrew et al. 2021): clients clip to the server's current norm (``ServerState.
      clip_norm``) before any client_transform and report whether they were within it; the server adds the
      noise and moves the norm towards the target quantile. Needs weighting="uniform".
    weighting: "num_examples" (FedAvg) or "uniform" (every client of the cohort weighs 1, also one without
      examples, which sends a zero update: the mean is over the cohort size, as DP-FedAvg's sensitivity
      bound needs).
    mesh: optional ``jax.sharding.Mesh`` with an axis "clients": each chunk's clients are split across its
      devices (one-program schedules, e.g. "vmap" or "chunked:K" with K a multiple of the device count).
      See :func:`client_mesh`.
  """

  local: LocalTraining
  server_optimizer: optax.GradientTransformation = dataclasses.field(default_factory=lambda: optax.sgd(1.0))
  schedule: Schedule | str = "auto"
  trainable: str | None = None
  model_state: str = "average"
  postprocess: ClientPostprocess | None = None
  mesh: jax.sharding.Mesh | None = None
  client_transform: UpdateTransform | None = None
  server_transform: UpdateTransform | None = None
  weighting: str = "num_examples"
  downlink: UpdateTransform | None = None
  secure_aggregation: SecureAggregation | None = None
  memory_budget: int | None = None
  adaptive_clip: AdaptiveClipping | None = None

  def __post_init__(self):
    if self.weighting not in ("num_examples", "uniform"):
      raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}.")
    builtin = self.client_transform is not None or self.weighting != "num_examples" or \
        self.secure_aggregation is not None or self.adaptive_clip is not None
    if self.adaptive_clip is not None and self.weighting != "uniform":
      raise ValueError('adaptive_clip bounds each client\'s share of a uniformly weighted mean: use '
                       'weighting="uniform".')
    if self.postprocess is not None and builtin:
      raise ValueError("Give either postprocess or client_transform/weighting/secure_aggregation, not both.")
    if self.downlink is not None and self.downlink.encoded_bits is None:
      raise ValueError("downlink must be a compressor (a transform with encoded_bits), e.g. compression.int8().")
    if builtin:
      self.postprocess = self._client_postprocess
    if isinstance(self.schedule, str):
      spec = self.schedule.strip()
      self.schedule = default_schedule(local=self.local) if spec == "auto" else Schedule.parse(spec)
    if self.model_state not in MODEL_STATE_MODES:
      raise ValueError(f"model_state must be one of {MODEL_STATE_MODES}, got {self.model_state!r}.")
    if self.model_state == "frozen":
      self.local = dataclasses.replace(self.local, norm_stats="frozen")
    self._runners: dict[int, CohortRunner] = {}
    self._num_outputs: int | None = None
    self._server_update = jax.jit(self._server_update_impl)
    self._broadcast = jax.jit(lambda p, k: self.downlink.apply(p, self.downlink.init(p), k)[0])

  def _client_postprocess(self, out: ClientOutput, carry, ctx: ClientContext):
    key = ctx.key
    if self.adaptive_clip is not None:
      delta, below = AdaptiveClipping.clip(out.delta, ctx.shared["clip"])
      out = out._replace(delta=delta, metrics={**out.metrics, "below_clip": below})
    if self.client_transform is not None:
      t = self.client_transform
      delta, new_carry = t.apply(out.delta, t.init(out.delta) if carry is None else carry, key)
      out = out._replace(delta=delta)
      if carry is not None:  # a client without examples sent nothing; its state must not move
        carry = jax.tree.map(lambda new, old: jnp.where(out.num_examples > 0, new, old), new_carry, carry)
    if self.weighting == "uniform":  # every real client of the cohort, even one without examples (DP's m)
      out = out._replace(num_examples=(ctx.client_id >= 0).astype(jnp.float32))
    if self.secure_aggregation is not None:
      sa = self.secure_aggregation
      masked, clipped = sa.client_encode(out.delta, out.num_examples, ctx.position,
                                         jax.random.fold_in(key, 7), ctx.shared["secagg"])
      alive = ctx.shared["secagg"].alive[ctx.position]
      out = out._replace(delta=masked, num_examples=jnp.where(alive, out.num_examples, 0.0),
                         metrics={**out.metrics, "secagg_clipped": clipped})
    return out, carry

  def init(self, params: Params, model_state: ModelState | None = None,
           num_clients: int | None = None) -> ServerState:
    """Server state from initial params; ``num_clients`` (the population size) is needed for "local"."""
    trainable, frozen = split_params(params, self.trainable)
    if self.downlink is not None and not is_stateless(self.downlink, trainable):
      raise ValueError("downlink must be stateless (every client decodes the broadcast on its own).")
    model_state = model_state or {}
    if self.secure_aggregation is not None and self.model_state == "average" and jax.tree.leaves(model_state):
      raise ValueError('Secure aggregation covers the params only; with model_state="average" the BatchNorm '
                       'statistics would be sent in the clear. Use model_state="frozen" or "local".')
    transform_states = server_transform_state = None
    t = self.client_transform
    if t is not None and not is_stateless(t, trainable):
      if not num_clients:
        raise ValueError("client_transform keeps a state per client (e.g. error feedback): pass num_clients "
                         "to init().")
      one = t.init(trainable)
      transform_states = jax.tree.map(lambda a: jnp.zeros((num_clients, *a.shape), a.dtype) + a, one)
    if self.server_transform is not None and not is_stateless(self.server_transform, trainable):
      server_transform_state = self.server_transform.init(trainable)
    client_states = None
    if self.model_state == "local":
      if not num_clients:
        raise ValueError('model_state="local" keeps a state per client: pass num_clients to init().')
      client_states = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)).copy(), model_state)
    clip_norm = self.adaptive_clip.init() if self.adaptive_clip is not None else None
    return ServerState(trainable, frozen, model_state, self.server_optimizer.init(trainable),
                       jnp.zeros((), jnp.int32), client_states, transform_states, server_transform_state, clip_norm)

  def _check_labels(self, data: FederatedData) -> None:
    """Raises if ``data`` has labels the model has no logit for (they would give NaN losses, reported later as
    a diverged model). The data's own labels are checked against its ``num_classes`` when it is built."""
    if self._num_outputs is None:
      self._num_outputs = self.local.model.num_outputs()
    k, top = self._num_outputs, data.label_range[1]
    if top >= k:
      raise ValueError(f"The data has labels up to {top} (num_classes={data.num_classes}) but the model has {k} "
                       f"outputs: labels >= {k} have no logit and give NaN losses. Build the model with "
                       f"num_classes={max(data.num_classes, top + 1)} outputs, or remap the labels to 0..{k - 1}.")

  def runner(self, pad_size: int) -> CohortRunner:
    if pad_size not in self._runners:
      self._runners[pad_size] = CohortRunner(self.local, self.schedule, pad_size, self.postprocess,
                                             per_client_state=self.model_state == "local", mesh=self.mesh)
    return self._runners[pad_size]

  def communication_bits(self, state: ServerState) -> tuple[int, int]:
    """(bits down, bits up) per client per round, exact: the trainable params as encoded by ``downlink`` /
    ``client_transform`` (dense float32 without one; 32-bit field elements under secure aggregation), plus the
    averaged model state."""
    extra = 8 * tree_bytes(state.model_state) if self.model_state == "average" else 0
    down = encoded_bits(self.downlink, state.params) + extra
    if self.secure_aggregation is not None:
      up = FIELD_BITS * sum(int(a.size) for a in jax.tree.leaves(state.params))
    else:
      up = encoded_bits(self.client_transform, state.params)
    return down, up + extra

  def communication_bytes(self, state: ServerState) -> tuple[int, int]:
    """(bytes down, bytes up) per client per round: the bits rounded up to whole bytes."""
    down, up = self.communication_bits(state)
    return -(-down // 8), -(-up // 8)

  def _server_update_impl(self, state: ServerState, sums: RoundSums, key: PRNGKey,
                          below_count: jax.Array) -> ServerState:
    total = jnp.maximum(sums.weight_sum, 1e-12)
    mean_delta = jax.tree.map(lambda d, p: (d / total).astype(p.dtype), sums.delta_sum, state.params)
    clip_norm = state.clip_norm
    if self.adaptive_clip is not None:
      mean_delta, clip_norm = self.adaptive_clip.server_step(mean_delta, below_count, state.clip_norm,
                                                             jax.random.fold_in(key, 4 << 20))
    server_ts = state.server_transform_state
    if self.server_transform is not None:
      t = self.server_transform
      mean_delta, new_ts = t.apply(mean_delta, t.init(mean_delta) if server_ts is None else server_ts,
                                   jax.random.fold_in(key, 3 << 20))
      server_ts = None if server_ts is None else new_ts
    updates, opt_state = self.server_optimizer.update(pseudo_gradient(mean_delta), state.opt_state,
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if self.model_state in ("average", "local"):
      model_state = jax.tree.map(lambda s, m: (s / total).astype(m.dtype), sums.state_sum, state.model_state)
    return ServerState(params, state.frozen, model_state, opt_state, state.round + 1, state.client_states,
                       state.transform_states, server_ts, clip_norm)

  def apply(self, state: ServerState, data: FederatedData, client_ids: np.ndarray,
            round_key: PRNGKey) -> tuple[dict, ServerState]:
    """One round: returns (metrics, new_state). Metrics are device scalars plus per-client arrays."""
    self._check_labels(data)
    runner = self.runner(data.pad_size)
    if runner.schedule.chunk_size == -1:  # "chunked:auto": size the chunks for memory once
      ms = state.client_states if self.model_state == "local" else state.model_state
      runner.resolve_chunk_size(state.params, state.frozen, ms, data.x, data.y, len(client_ids),
                                self.memory_budget)
    cohort = data.cohort(client_ids, pad_clients_to=runner.padded_cohort_size(len(client_ids)))
    rows = jnp.maximum(cohort.client_ids, 0)
    ids = jnp.asarray(client_ids)
    model_state = state.model_state
    if self.model_state == "local":
      if jax.tree.leaves(state.client_states)[0].shape[0] != data.num_clients:
        raise ValueError(f"Server state holds {jax.tree.leaves(state.client_states)[0].shape[0]} client states "
                         f"but the data has {data.num_clients} clients.")
      model_state = jax.tree.map(lambda a: a[rows], state.client_states)
    carry = None
    if state.transform_states is not None:
      if jax.tree.leaves(state.transform_states)[0].shape[0] != data.num_clients:
        raise ValueError(f"Server state holds {jax.tree.leaves(state.transform_states)[0].shape[0]} client "
                         f"transform states but the data has {data.num_clients} clients.")
      carry = jax.tree.map(lambda a: a[rows], state.transform_states)
    params = state.params
    if self.downlink is not None:  # what the clients receive and train from
      params = self._broadcast(state.params, jax.random.fold_in(round_key, 5 << 20))
    shared, secagg_info = {"clip": state.clip_norm, "secagg": None}, {}
    if self.secure_aggregation is not None:
      max_weight = 1.0 if self.weighting == "uniform" else float(data.pad_size)
      shared["secagg"], host = self.secure_aggregation.setup_round(len(client_ids), cohort.size, round_key,
                                                                   max_weight)
    sums = runner(params, state.frozen, model_state, data.x, data.y, cohort, round_key, carry, shared)
    if self.secure_aggregation is not None:
      recovery, secagg_info = self.secure_aggregation.recover(host)
      if recovery is None:  # too few survivors to unmask: the round is aborted, nothing changes but the count
        sums = sums._replace(client_carry=carry)
        new_state = state._replace(round=state.round + 1)
      else:
        sa_shared = shared["secagg"]
        sums = sums._replace(delta_sum=self.secure_aggregation.unmask(sums.delta_sum, recovery, sa_shared.scale,
                                                                      sa_shared.max_weight))
    cm = sums.client_metrics
    below = jnp.zeros((), jnp.float32)
    if "below_clip" in cm:  # real clients (the cohort's first len(client_ids) rows) within the clip norm
      below = cm["below_clip"][: len(client_ids)].sum()
    if not secagg_info.get("secagg_aborted"):
      new_state = self._server_update(state, sums, round_key, below)
    if self.model_state == "local":
      new_state = new_state._replace(client_states=jax.tree.map(
          lambda all_, new: all_.at[ids].set(new[: len(client_ids)]), state.client_states, sums.client_states))
    if carry is not None:
      new_state = new_state._replace(transform_states=jax.tree.map(
          lambda all_, new: all_.at[ids].set(new[: len(client_ids)]), state.transform_states, sums.client_carry))
    w = cm["num_examples"]
    down, up = self.communication_bytes(state)
    if self.adaptive_clip is not None:
      secagg_info = {**secagg_info, "clip_norm": state.clip_norm, "clip_fraction_within": below / len(client_ids)}
    senders = secagg_info.get("secagg_survivors", len(client_ids))
    if "secagg_clipped" in cm:
      secagg_info["secagg_clipped_fraction"] = cm["secagg_clipped"][: len(client_ids)].mean()
    metrics = {
        **secagg_info,
        "train_loss": (cm["loss"] * w).sum() / jnp.maximum(w.sum(), 1.0),
        "train_accuracy": (cm["accuracy"] * w).sum() / jnp.maximum(w.sum(), 1.0),
        "num_examples": w.sum(),
        "bytes_down": down * len(client_ids),
        "bytes_up": up * senders,
        "client_metrics": {k: v[: len(client_ids)] for k, v in cm.items()},
    }
    return metrics, new_state
