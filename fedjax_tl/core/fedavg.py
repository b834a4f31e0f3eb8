"""FedAvg with a server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"), as init + apply.

``apply`` trains the cohort (any :class:`Schedule`), averages the client deltas weighted by their number of
examples (McMahan et al. 2017) and feeds the negated average to an optax server optimizer; plain FedAvg is
``optax.sgd(1.0)``. Only the trainable part of the params is trained and communicated; the frozen part is
fixed for the whole run.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.core.client import LocalTraining, merge_params
from fedjax_tl.core.execution import ClientPostprocess, CohortRunner, RoundSums, Schedule
from fedjax_tl.core.params import split_params, tree_bytes
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.transforms.base import UpdateTransform, is_stateless
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
    schedule: execution schedule or its text form; "auto" picks the measured default for the backend.
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
    postprocess: optional per-client transform of the client output before aggregation.
    client_transform: a stateless :class:`~fedjax_tl.transforms.UpdateTransform` applied to every client's
      delta before aggregation (vmapped, each client with its own key), e.g. ``clip_l2``.
    server_transform: a stateless transform applied to the mean delta (keyed by the round), e.g. Gaussian
      noise. ``transforms.dp_fedavg`` returns both halves of DP-FedAvg.
    weighting: "num_examples" (FedAvg) or "uniform" (every client of the cohort weighs 1, as DP-FedAvg's
      sensitivity bound needs).
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

  def __post_init__(self):
    if self.weighting not in ("num_examples", "uniform"):
      raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}.")
    if self.postprocess is not None and (self.client_transform is not None or self.weighting != "num_examples"):
      raise ValueError("Give either postprocess or client_transform/weighting, not both.")
    if self.client_transform is not None or self.weighting == "uniform":
      self.postprocess = self._client_postprocess
    if isinstance(self.schedule, str):
      self.schedule = Schedule.parse(self.schedule)
    if self.model_state not in MODEL_STATE_MODES:
      raise ValueError(f"model_state must be one of {MODEL_STATE_MODES}, got {self.model_state!r}.")
    if self.model_state == "frozen":
      self.local = dataclasses.replace(self.local, norm_stats="frozen")
    self._runners: dict[int, CohortRunner] = {}
    self._server_update = jax.jit(self._server_update_impl)

  def _client_postprocess(self, out, key):
    if self.client_transform is not None:
      t = self.client_transform
      out = out._replace(delta=t.apply(out.delta, t.init(out.delta), key)[0])
    if self.weighting == "uniform":
      out = out._replace(num_examples=(out.num_examples > 0).astype(jnp.float32))
    return out

  def init(self, params: Params, model_state: ModelState | None = None,
           num_clients: int | None = None) -> ServerState:
    """Server state from initial params; ``num_clients`` (the population size) is needed for "local"."""
    trainable, frozen = split_params(params, self.trainable)
    for name, t in (("client_transform", self.client_transform), ("server_transform", self.server_transform)):
      if t is not None and not is_stateless(t, trainable):
        raise ValueError(f"{name} has state; per-client and server transform state across rounds (error "
                         "feedback) is not supported yet, so only stateless transforms can be used.")
    model_state = model_state or {}
    client_states = None
    if self.model_state == "local":
      if not num_clients:
        raise ValueError('model_state="local" keeps a state per client: pass num_clients to init().')
      client_states = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)).copy(), model_state)
    return ServerState(trainable, frozen, model_state, self.server_optimizer.init(trainable),
                       jnp.zeros((), jnp.int32), client_states)

  def runner(self, pad_size: int) -> CohortRunner:
    if pad_size not in self._runners:
      self._runners[pad_size] = CohortRunner(self.local, self.schedule, pad_size, self.postprocess,
                                             per_client_state=self.model_state == "local", mesh=self.mesh)
    return self._runners[pad_size]

  def communication_bytes(self, state: ServerState) -> tuple[int, int]:
    """(bytes down, bytes up) per client per round: the trainable params (plus averaged model state)."""
    b = tree_bytes(state.params) + (tree_bytes(state.model_state) if self.model_state == "average" else 0)
    return b, b

  def _server_update_impl(self, state: ServerState, sums: RoundSums, key: PRNGKey) -> ServerState:
    total = jnp.maximum(sums.weight_sum, 1e-12)
    mean_delta = jax.tree.map(lambda d, p: (d / total).astype(p.dtype), sums.delta_sum, state.params)
    if self.server_transform is not None:
      t = self.server_transform
      mean_delta, _ = t.apply(mean_delta, t.init(mean_delta), jax.random.fold_in(key, 3 << 20))
    updates, opt_state = self.server_optimizer.update(pseudo_gradient(mean_delta), state.opt_state,
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if self.model_state in ("average", "local"):
      model_state = jax.tree.map(lambda s, m: (s / total).astype(m.dtype), sums.state_sum, state.model_state)
    return ServerState(params, state.frozen, model_state, opt_state, state.round + 1, state.client_states)

  def apply(self, state: ServerState, data: FederatedData, client_ids: np.ndarray,
            round_key: PRNGKey) -> tuple[dict, ServerState]:
    """One round: returns (metrics, new_state). Metrics are device scalars plus per-client arrays."""
    runner = self.runner(data.pad_size)
    cohort = data.cohort(client_ids, pad_clients_to=runner.padded_cohort_size(len(client_ids)))
    model_state = state.model_state
    if self.model_state == "local":
      if jax.tree.leaves(state.client_states)[0].shape[0] != data.num_clients:
        raise ValueError(f"Server state holds {jax.tree.leaves(state.client_states)[0].shape[0]} client states "
                         f"but the data has {data.num_clients} clients.")
      rows = jnp.maximum(cohort.client_ids, 0)
      model_state = jax.tree.map(lambda a: a[rows], state.client_states)
    sums = runner(state.params, state.frozen, model_state, data.x, data.y, cohort, round_key)
    new_state = self._server_update(state, sums, round_key)
    if self.model_state == "local":
      ids = jnp.asarray(client_ids)
      new_state = new_state._replace(client_states=jax.tree.map(
          lambda all_, new: all_.at[ids].set(new[: len(client_ids)]), state.client_states, sums.client_states))
    cm = sums.client_metrics
    w = cm["num_examples"]
    down, up = self.communication_bytes(state)
    metrics = {
        "train_loss": (cm["loss"] * w).sum() / jnp.maximum(w.sum(), 1.0),
        "train_accuracy": (cm["accuracy"] * w).sum() / jnp.maximum(w.sum(), 1.0),
        "num_examples": w.sum(),
        "bytes_down": down * len(client_ids),
        "bytes_up": up * len(client_ids),
        "client_metrics": {k: v[: len(client_ids)] for k, v in cm.items()},
    }
    return metrics, new_state
