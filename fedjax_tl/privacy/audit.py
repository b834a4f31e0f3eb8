"""Canary audit of a federated run: an empirical lower bound on epsilon from the run itself.

As in Andrew et al. 2023 ("One-shot Empirical Privacy Estimation for Federated Learning"), ``num_canaries``
canary clients join the population (ids ``num_clients .. num_clients + num_canaries - 1``, no examples) and
are sampled like every other client. Each canary is *held in* or *held out* by an independent fair coin
(seeded): a held-in canary, whenever it is in a cohort, sends a fixed random direction u_i (unit L2 norm,
scaled to ``canary_norm``, 100x the clip by default, so a correct aggregator clips it to the clip norm); a
held-out canary sends a zero update. Both go through the run's own aggregator (``encode``: clipping,
eligibility, masking; ``decode``: noise), so a clipping bug or a missing noise term shows. A held-out canary is
a neighbouring population of the held-in one (its data replaced by data with a zero update: replace-one, and
zero-out), so any (epsilon, delta) the accountant claims for a client covers it.

Score of canary i: the cosine between u_i and the sum over rounds of the released mean updates (what the
aggregator's ``decode`` returns: the model's trajectory; for ``server_optimizer=optax.sgd(1.0)`` the final
model minus the initial one), or ``score="max"``: the largest cosine with any single round's released update
(the all-iterates threat model). From the held-in and held-out scores, jax-privacy's
``CanaryScoreAuditor.epsilon_one_run`` (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run") gives epsilon_audit: with probability >= ``confidence`` the run's mechanism is *not*
(epsilon, delta)-DP for any epsilon < epsilon_audit. It is a lower bound: it can refute a privacy claim
(epsilon_audit > the accountant's epsilon means a bug), never confirm one; with m canaries it cannot exceed
about logit(alpha^(2/m)) (``epsilon_audit_max``: what perfectly separated scores would give), and a cosine
attack on a high-dimensional model is weak, so values far below the accountant's epsilon are expected.
What bypasses the aggregator (BatchNorm statistics averaged in the clear, metrics in the log) is not seen.

Use::

    audit = CanaryAudit(num_canaries=1000, seed=0, confidence=0.95)
    algo, data = audit.attach(algo, data)        # canary clients appended; the aggregator wrapped
    state, history = run_rounds(algo, algo.init(params, model_state), data, rounds=R, cohort_size=m, seed=0)
    print(audit.result(state, delta=1e-5))       # {"epsilon_audit": ..., "audit_confidence": 0.95, ...}

Account with the population including the canaries (``data.num_clients`` after ``attach``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import keys
from fedjax_tl.aggregators.base import reducer_of
from fedjax_tl.core.execution import ClientContext
from fedjax_tl.privacy._deps import jax_privacy

__all__ = ["CanaryAudit", "CanaryAggregator", "epsilon_lower_bound", "audit_mechanism", "SCORES"]

SCORES = ("sum", "max")
CANARY_FACTOR = 100.0  # default canary norm: this many times the aggregator's clip


def epsilon_lower_bound(in_scores, out_scores, confidence: float = 0.95, delta: float = 0.0) -> float:
  """jax-privacy's one-run lower bound on epsilon (Steinke et al. 2023) at ``confidence`` from the attack scores
  of held-in and held-out canaries (higher = "in"), with Bonferroni over the thresholds."""
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  auditing = jax_privacy("auditing")
  auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64))
  return float(auditor.epsilon_one_run(significance=1 - confidence, delta=max(delta, 1e-300)))


def _unit(key, template):
  """A uniformly random unit-L2-norm direction in the space of ``template`` (float32 leaves)."""
  leaves, treedef = jax.tree.flatten(template)
  ks = jax.random.split(key, max(len(leaves), 1))
  draws = [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(ks, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(d * d) for d in draws))
  return jax.tree.unflatten(treedef, [d / norm for d in draws])


def _direction(seed: int, index, template):
  """Canary ``index``'s unit direction u_index (traceable in ``index``)."""
  return _unit(jax.random.fold_in(jax.random.PRNGKey(seed), index), template)


def _held_in(seed: int, num_canaries: int) -> np.ndarray:
  """Which canaries are held in: independent fair coins from the seed (bool [num_canaries])."""
  return np.random.default_rng([seed, 0xCA7A]).random(num_canaries) < 0.5


def _cosines(seed: int, num_canaries: int, tree) -> jax.Array:
  """cos(u_i, tree) for every canary i (0 if ``tree`` is zero), canaries generated in batches."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

  def one(i):
    u = _direction(seed, i, tree)
    return sum(jnp.sum(a * b.astype(jnp.float32)) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(tree)))

  dots = jax.lax.map(one, jnp.arange(num_canaries), batch_size=min(num_canaries, 64))
  return jnp.where(norm > 0, dots / jnp.maximum(norm, 1e-30), 0.0)


def _check_uniform(aggregator) -> None:
  weighting = getattr(aggregator, "weighting", "uniform")
  if weighting != "uniform":
    raise ValueError(f"The audit's canary clients have no examples: under {type(aggregator).__name__}'s "
                     f"weighting={weighting!r} their weight would be 0 and they would never be heard. Audit a "
                     "uniformly weighted aggregator (DPFedAvg, DPFTRL, AdaptiveClipping, UniformMean(), "
                     "SecureAggregation(weighting='uniform')).")


@dataclasses.dataclass(frozen=True)
class CanaryAggregator:
  """Wraps a FedAvg aggregator for the audit: canary clients' deltas are replaced by their canary update before
  ``inner.encode``; ``decode`` keeps the released means' sum and/or per-canary max cosine. Everything else is
  the inner aggregator's. Build with :meth:`CanaryAudit.wrap` (or :meth:`CanaryAudit.attach`)."""

  inner: object
  num_real: int
  num_canaries: int
  seed: int
  canary_norm: float
  score: str = "sum"

  def __post_init__(self):
    _check_uniform(self.inner)
    if self.score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {self.score!r}.")
    if self.num_canaries < 2 or self.num_real < 0 or not self.canary_norm > 0:
      raise ValueError(f"Need num_canaries >= 2, num_real >= 0 and canary_norm > 0, got {self.num_canaries}, "
                       f"{self.num_real}, {self.canary_norm}.")

  @property
  def reducer(self):
    """The wrapped aggregator's reduction (the canaries' messages are encoded by it)."""
    return reducer_of(self.inner)

  @property
  def covers_model_state(self) -> bool:
    return getattr(self.inner, "covers_model_state", True)

  @property
  def held_in(self) -> np.ndarray:
    """Which canaries are held in (bool [num_canaries])."""
    return _held_in(self.seed, self.num_canaries)

  def init(self, template):
    state = {"inner": self.inner.init(template), "rounds": jnp.zeros((), jnp.int32)}
    if self.score == "sum":
      state["sum"] = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), template)
    else:
      state["max"] = jnp.full((self.num_canaries,), -jnp.inf, jnp.float32)
    return state

  def setup(self, state, num_clients, padded, max_weight, key):
    return self.inner.setup(state["inner"], num_clients, padded, max_weight, key)

  def canary_update(self, client_id, template):
    """The update client ``client_id`` sends if it is a canary (zeros for a held-out one), and whether it is."""
    idx = client_id - self.num_real
    is_canary = (idx >= 0) & (idx < self.num_canaries)
    row = jnp.clip(idx, 0, self.num_canaries - 1)
    scale = jnp.where(jnp.asarray(self.held_in)[row], self.canary_norm, 0.0)
    u = _direction(self.seed, row, template)
    return jax.tree.map(lambda a: (a * scale).astype(jnp.result_type(a)), u), is_canary

  def encode(self, delta, num_examples, state, shared, ctx):
    canary, is_canary = self.canary_update(ctx.client_id, delta)
    delta = jax.tree.map(lambda c, d: jnp.where(is_canary, c.astype(d.dtype), d), canary, delta)
    inner_ctx = ctx._replace(shared=(state["inner"], shared))
    return self.inner.encode(delta, num_examples, state["inner"], shared, inner_ctx)

  def aggregate(self, message_sum, weight_sum, shared, host):
    return self.inner.aggregate(message_sum, weight_sum, shared, host)

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    mean, inner_state, metrics = self.inner.decode(total, weight_sum, state["inner"], client_metrics, real, key)
    new = {"inner": inner_state, "rounds": state["rounds"] + 1}
    if self.score == "sum":
      new["sum"] = jax.tree.map(lambda s, m: s + m.astype(jnp.float32), state["sum"], mean)
    else:
      new["max"] = jnp.maximum(state["max"], _cosines(self.seed, self.num_canaries, mean))
    return mean, new, metrics

  def bits(self, template):
    return self.inner.bits(template)

  def scores(self, state) -> np.ndarray:
    """Every canary's score from the wrapper's state (``ServerState.aggregator_state``)."""
    return _scores(self.seed, self.num_canaries, self.score, state)


def _scores(seed: int, num_canaries: int, score: str, agg_state) -> np.ndarray:
  if not isinstance(agg_state, dict) or "rounds" not in agg_state or score not in agg_state:
    raise ValueError(f"This aggregator state is not a CanaryAggregator's with score {score!r}: run the FedAvg "
                     "that CanaryAudit.attach returned (with the same CanaryAudit).")
  if score == "sum":
    return np.asarray(_cosines_jit(seed, num_canaries, agg_state["sum"]))
  return np.asarray(agg_state["max"])


_cosines_jit = jax.jit(_cosines, static_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class CanaryAudit:
  """The audit's configuration; :meth:`attach` enables it on a FedAvg run, :meth:`result` reports it.

  Attributes:
    num_canaries: canary clients added to the population (about half held in).
    seed: draws the canaries' directions and which are held in.
    confidence: of the lower bound (1 - the auditor's significance).
    canary_norm: L2 norm of a held-in canary's update; None: 100x the aggregator's ``clip`` (or its
      ``initial_clip``), so that a correct aggregator clips it to the clip norm and a missing clip shows (the
      more, the larger the factor).
    score: "sum" (cosine with the sum of the released updates: the final model) or "max" (largest cosine with
      any round's released update: all iterates).
  """

  num_canaries: int = 1000
  seed: int = 0
  confidence: float = 0.95
  canary_norm: float | None = None
  score: str = "sum"

  def __post_init__(self):
    if self.num_canaries < 2:
      raise ValueError(f"The audit needs at least 2 canaries (some held in, some held out), got {self.num_canaries}.")
    if not 0 < self.confidence < 1:
      raise ValueError(f"confidence must be in (0, 1), got {self.confidence}.")
    if self.score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {self.score!r}.")
    if self.canary_norm is not None and not self.canary_norm > 0:
      raise ValueError(f"canary_norm must be > 0, got {self.canary_norm}.")

  def population(self, num_clients: int) -> int:
    """The population the accountant must see: the clients plus the canaries."""
    return num_clients + self.num_canaries

  def wrap(self, aggregator, num_real: int) -> CanaryAggregator:
    """``aggregator`` with the canaries (ids ``num_real ..``) inserted."""
    _check_uniform(aggregator)
    norm = self.canary_norm
    if norm is None:
      clip = getattr(aggregator, "clip", None)
      clip = getattr(aggregator, "initial_clip", None) if clip is None or callable(clip) else clip
      if clip is None or not math.isfinite(clip):
        raise ValueError(f"{type(aggregator).__name__} has no finite clip norm to scale the canaries to: give "
                         "CanaryAudit(canary_norm=...) (e.g. the clip the privacy claim assumes).")
      norm = CANARY_FACTOR * float(clip)
    return CanaryAggregator(aggregator, num_real, self.num_canaries, self.seed, norm, self.score)

  def add_canaries(self, data):
    """``data`` with ``num_canaries`` clients without examples appended (same on-device examples)."""
    from fedjax_tl.data.client_data import FederatedData

    empty = [np.zeros(0, np.int64)] * self.num_canaries
    return FederatedData(data.x, data.y, list(data.client_indices) + empty, data.num_classes, data.pad_size)

  def attach(self, algorithm, data):
    """(the FedAvg with its aggregator wrapped, the data with the canary clients): run these two instead.

    Refuses a FedAvg whose privacy is not in its aggregator (a ``server_transform`` adds noise after the
    aggregator, where the canaries are scored; ``postprocess`` replaces the aggregator's encoding): use
    ``aggregator=DPFedAvg(clip, noise_multiplier, cohort_size)`` instead of ``transforms.dp_fedavg``."""
    if algorithm.server_transform is not None:
      raise ValueError("The audit scores the aggregator's released update, but this FedAvg adds its noise in a "
                       "server_transform after it (transforms.dp_fedavg): use aggregator=DPFedAvg(clip, "
                       "noise_multiplier, cohort_size) (or DPFTRL) with no server_transform.")
    if algorithm.postprocess is not None:
      raise ValueError("The audit needs the aggregator's encoding; this FedAvg has a postprocess instead.")
    if isinstance(algorithm.aggregator, CanaryAggregator):
      raise ValueError("This FedAvg is already audited (its aggregator is a CanaryAggregator).")
    wrapped = dataclasses.replace(algorithm, aggregator=self.wrap(algorithm.aggregator, data.num_clients))
    return wrapped, self.add_canaries(data)

  def result(self, state, delta: float) -> dict:
    """epsilon_audit and how it was obtained, from the final ``ServerState`` of the attached run."""
    agg_state = state.aggregator_state
    scores = _scores(self.seed, self.num_canaries, self.score, agg_state)
    return self.report(scores, delta, int(agg_state["rounds"]))

  def report(self, scores, delta: float, rounds: int | None = None) -> dict:
    """The audit's result from every canary's score (canary order)."""
    scores = np.asarray(scores, np.float64)
    held_in = _held_in(self.seed, self.num_canaries)
    if held_in.all() or not held_in.any():
      raise ValueError("All canaries fell on one side (held in or held out): use more canaries.")
    ins, outs = scores[held_in], scores[~held_in]
    eps = epsilon_lower_bound(ins, outs, self.confidence, delta)
    ceiling = epsilon_lower_bound(np.ones(len(ins)), np.zeros(len(outs)), self.confidence, delta)
    out = {"epsilon_audit": eps, "epsilon_audit_max": ceiling, "audit_confidence": self.confidence,
           "audit_delta": delta, "audit_canaries": self.num_canaries, "audit_held_in": int(held_in.sum()),
           "audit_score": self.score, "audit_auroc": float(_auroc(ins, outs))}
    if rounds is not None:
      out["audit_rounds"] = rounds
    return out


def _auroc(ins: np.ndarray, outs: np.ndarray) -> float:
  """P(score of a held-in canary > score of a held-out one) (+1/2 for ties)."""
  diff = ins[:, None] - outs[None, :]
  return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def audit_mechanism(aggregator, audit: CanaryAudit, template, *, num_clients: int, rounds: int, sampler: Callable,
                    delta: float, seed: int = 0, client_update: Callable | None = None) -> tuple[dict, list[dict]]:
  """Audits an aggregator alone, without training: the clients send synthetic updates.

  Runs FedAvg's aggregation protocol (``setup``; ``encode`` per client with its key and
  :class:`~fedjax_tl.core.execution.ClientContext`; the weighted sum; ``aggregate``; ``decode`` with the round's
  aggregator key) for ``rounds`` rounds with the audit's canaries inserted and returns (``audit.report``, the
  per-round aggregator metrics). ``sampler(key, r)`` draws from ``num_clients + audit.num_canaries`` clients (ids
  >= num_clients are the canaries). ``client_update(key, template)`` is a real client's update, traced and
  vmapped over the cohort (default: a uniformly random direction of norm twice the canary norm / 100, i.e. twice
  the clip by default). Seconds for 10^4-10^5 parameters: the way to check a mechanism's claim, or to catch a
  bug in a new aggregator, before training with it.
  """
  agg = audit.wrap(aggregator, num_clients)
  if client_update is None:
    norm = 2.0 * agg.canary_norm / CANARY_FACTOR
    client_update = lambda key, tmpl: jax.tree.map(lambda u: u * norm, _unit(key, tmpl))  # noqa: E731

  @jax.jit
  def encode_all(ids, state, shared, round_key):
    def one(cid, pos):
      ckey = keys.client(round_key, cid)
      ctx = ClientContext(cid, pos, keys.postprocess(ckey), (state, shared))
      return agg.encode(client_update(ckey, template), jnp.int32(0), state, shared, ctx)

    msgs, weights, metrics = jax.vmap(one)(ids, jnp.arange(ids.shape[0], dtype=jnp.int32))
    total = reducer_of(agg)(msgs, weights)  # as the round reduces: declared by the aggregator
    return total, weights.sum(), metrics

  decode = jax.jit(agg.decode)
  state = agg.init(template)
  history = []
  for r in range(rounds):
    ids = np.asarray(sampler(keys.sampling(seed, r), r), np.int32)
    round_key = keys.round_key(seed, r)
    shared, host = agg.setup(state, len(ids), len(ids), 1.0, round_key)
    total, weight_sum, metrics = encode_all(jnp.asarray(ids), state, shared, round_key)
    total, weight_sum, info = agg.aggregate(total, weight_sum, shared, host)
    real = jnp.ones(len(ids), jnp.float32)
    _, state, agg_metrics = decode(total, weight_sum, state, metrics, real, keys.server(round_key, "aggregator"))
    history.append({"round": r + 1, **{k: np.asarray(v).tolist() for k, v in {**info, **agg_metrics}.items()}})
  return audit.report(agg.scores(state), delta, rounds), history
