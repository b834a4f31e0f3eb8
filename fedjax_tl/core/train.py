"""The round loop shared by the experiments and the benchmarks: sampling, keys, NaN checks, logging."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import jax
import numpy as np

from fedjax_tl.core.fedavg import FedAvg, ServerState, sample_clients
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.keys import round_keys
from fedjax_tl.types import PRNGKey

__all__ = ["run_rounds", "round_keys", "CompileTimer", "DivergenceWarning"]

# jax.monitoring time spans of tracing, lowering to MLIR and XLA compilation (jax._src.dispatch).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class DivergenceWarning(UserWarning):
  """:func:`run_rounds`'s warning that the training loss has grown far above its first value while still finite
  (the run goes on; a non-finite loss stops it with a FloatingPointError). Turn it into an error with
  ``warnings.simplefilter("error", ftl.DivergenceWarning)``, or off with ``run_rounds(..., divergence=None)``."""


class CompileTimer:
  """Context manager: seconds JAX spent tracing, lowering and compiling inside it (``.seconds``).

  Listens to jax.monitoring's time spans of those phases; nested spans (a jitted function traced inside
  another's trace) are merged, so every second counts once.
  """

  def __init__(self):
    self._spans: list[tuple[float, float]] = []

  def _on_span(self, event: str, start: float, end: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      self._spans.append((start, end))

  def __enter__(self) -> CompileTimer:
    jax.monitoring.register_event_time_span_listener(self._on_span)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._on_span)

  @property
  def seconds(self) -> float:
    total, reach = 0.0, -math.inf
    for start, end in sorted(self._spans):
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total


def _to_python(v):
  """A metric as JSON-able Python: scalars as bool/int/float, arrays as (nested) lists, dicts recursively."""
  if isinstance(v, dict):
    return {k: _to_python(u) for k, u in v.items()}
  if isinstance(v, bool | int | float | str) or v is None:
    return v
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()


def _check_cohort(ids, num_clients: int, r: int) -> np.ndarray:
  """The sampler's cohort as a 1-D integer array of distinct client ids in [0, num_clients), or an error naming
  what is wrong (a duplicate would train and weight a client twice and write its per-client state twice; a float
  id would be truncated; an empty cohort has nothing to average)."""
  ids = np.asarray(ids)
  where = f"The sampler's cohort for round {r + 1}"
  if ids.ndim != 1:
    raise ValueError(f"{where} has shape {ids.shape}; return a 1-D array of client ids.")
  if ids.size == 0:
    raise ValueError(f"{where} is empty; return at least one client id (a round needs a reporting client).")
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{where} has dtype {ids.dtype} ({ids[:5].tolist()}...); client ids are integers: return e.g. "
                    "np.asarray(ids, np.int32) (floats would be truncated).")
  bad = ids[(ids < 0) | (ids >= num_clients)]
  if bad.size:
    raise ValueError(f"{where} has ids {sorted(set(bad.tolist()))[:5]} outside [0, {num_clients}) (the data's "
                     "clients).")
  values, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{where} repeats clients {values[counts > 1][:5].tolist()}: each client trains once per round; "
                     "sample without replacement (e.g. rng.choice(n, k, replace=False)).")
  return ids


def dropouts(rate: float, seed: int = 0) -> Callable[[int, np.ndarray], np.ndarray]:
  """``run_rounds(reported=...)``: each sampled client fails to report with probability ``rate``, independently,
  drawn from (seed, round, client id) only, so a resumed run replays the same dropouts."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropouts' rate must be in [0, 1), got {rate}.")

  def reported(r: int, ids: np.ndarray) -> np.ndarray:
    return np.array([np.random.default_rng([seed, r, int(c)]).random() >= rate for c in ids], bool)

  return reported


def stragglers(fraction: float, budget: int, seed: int = 0) -> Callable[[int, np.ndarray], np.ndarray]:
  """``run_rounds(step_budget=...)``: each sampled client is a straggler with probability ``fraction`` and then runs
  at most ``budget`` local steps this round (the others are not limited); drawn from (seed, round, client id)."""
  if not 0.0 <= fraction <= 1.0 or budget < 0:
    raise ValueError(f"stragglers needs fraction in [0, 1] and budget >= 0, got {fraction}, {budget}.")
  unlimited = np.iinfo(np.int32).max

  def step_budget(r: int, ids: np.ndarray) -> np.ndarray:
    slow = [np.random.default_rng([seed, r, int(c), 1]).random() < fraction for c in ids]
    return np.where(slow, budget, unlimited).astype(np.int64)

  return step_budget


def run_rounds(algorithm: FedAvg, state: ServerState, data: FederatedData, *, rounds: int,
               cohort_size: int | None = None, seed: int, evaluate_fn: Callable[[ServerState], dict] | None = None,
               eval_every: int = 1, on_round: Callable[[dict, ServerState], None] | None = None,
               round_metrics: Callable[[int], dict] | None = None,
               bytes_so_far: tuple[float, float] = (0, 0),
               sampler: Callable[[PRNGKey, int], np.ndarray] | None = None,
               divergence: float | None = 100.0,
               state_metrics: Callable[[int, ServerState], dict] | None = None,
               reported: Callable[[int, np.ndarray], np.ndarray] | None = None,
               step_budget: Callable[[int, np.ndarray], np.ndarray] | None = None) -> tuple[ServerState, list[dict]]:
  """Runs ``rounds`` rounds from ``state`` and returns (final state, per-round records).

  Each record holds the round number, every metric the algorithm returned (device scalars as numbers, arrays as
  lists; the per-client metrics under ``client_metrics``, aligned with ``client_ids``, the round's cohort), the
  cumulative uplink/downlink megabytes of the run (``mb_up_total``/``mb_down_total``, starting from
  ``bytes_so_far`` = (up, down) of the rounds before a resume), ``compile_s`` (seconds the round spent
  tracing and compiling: the first round, or one that first runs a new program), ``wall_s`` (the round's
  time until the new server state is computed, excluding ``compile_s``), examples/s (over ``wall_s``) and,
  every ``eval_every`` rounds and at the end, the evaluation metrics prefixed ``test_``.
  The cohort of round r is ``sampler(key, r)`` (default: ``cohort_size`` clients uniformly without replacement,
  :func:`sample_clients`), with ``key`` derived from the seed and r (:func:`fedjax_tl.keys.sampling`); it must
  return distinct integer ids of the data's clients, at least one (anything else is an error naming the round).
  A non-finite training loss stops the run with an error naming the round; a finite one more than ``divergence``
  times the run's first round's (or than ``divergence`` times ln(num_classes), a uniform guess's loss, if that is
  larger) warns once per run with a :class:`DivergenceWarning` naming the round and the ratio, and the run goes on
  (``divergence=None``: no warning). ``on_round(record, state)`` is
  called after every round (metrics files, checkpoints); ``round_metrics(round)`` adds entries to a round's
  record (e.g. the privacy spent so far), ``state_metrics(round, state)`` entries computed from the new state
  (e.g. a privacy audit's lower bound in the last round). Participation and work are round inputs:
  ``reported(r, client_ids)`` (bool per client: dropouts) and ``step_budget(r, client_ids)`` (most local steps per
  client: stragglers), both functions of the 0-based round and its cohort (see :meth:`FedAvg.apply`; make them
  deterministic in ``r`` so that a resumed run replays them, e.g. :func:`fedjax_tl.dropouts`).
  """
  if sampler is None:
    if cohort_size is None:
      raise ValueError("run_rounds needs cohort_size or a sampler.")
    sampler = lambda key, r: sample_clients(key, data.num_clients, cohort_size)  # noqa: E731
  if divergence is not None and not divergence > 1:
    raise ValueError(f"run_rounds' divergence must be a factor > 1 (or None to turn the warning off), got "
                     f"{divergence}.")
  history = []
  up_total, down_total = bytes_so_far

  def draw(r: int, key) -> tuple[np.ndarray, dict]:
    ids = _check_cohort(sampler(key, r), data.num_clients, r)
    return ids, {name: np.asarray(fn(r, ids)) for name, fn in (("reported", reported), ("step_budget", step_budget))
                 if fn is not None}

  # Host-resident data (HostFederatedData) moves each round's cohort to the device: draw the next round's cohort
  # one round early (the sampler is a function of (key, round)) and gather it while the current round computes.
  prefetch = hasattr(data, "prefetch") and hasattr(algorithm, "prefetch")
  ahead = None
  first_loss, warned = None, False
  start_round = int(state.round)
  for r in range(start_round, start_round + rounds):
    with CompileTimer() as compile_timer:
      t0 = time.perf_counter()
      sample_key, train_key = round_keys(seed, r)
      if ahead is not None and ahead[0] == r:  # drawn last round to prefetch this round's cohort
        ids, inputs = ahead[1], ahead[2]
      else:
        ids, inputs = draw(r, sample_key)
      state, metrics = algorithm.apply(state, data, ids, train_key, **inputs)
      if prefetch and r + 1 < start_round + rounds:  # host data: the next cohort's examples move meanwhile
        ahead = (r + 1, *draw(r + 1, round_keys(seed, r + 1)[0]))
        algorithm.prefetch(data, ahead[1], ahead[2].get("reported"))
      state = jax.block_until_ready(state)  # the server update is dispatched asynchronously: time it too
      loss = float(metrics["train_loss"])
      elapsed = time.perf_counter() - t0
    compile_s = min(compile_timer.seconds, elapsed)
    wall = elapsed - compile_s
    if not math.isfinite(loss):
      raise FloatingPointError(
          f"Client training loss is {loss} in round {r + 1}; the model diverged. Lower the client learning "
          "rate, clip gradients (optax.clip_by_global_norm) or check the inputs for NaNs.")
    if first_loss is None:
      first_loss = loss
    reference = max(first_loss, math.log(max(getattr(data, "num_classes", None) or 2, 2)))
    if divergence is not None and not warned and loss > divergence * reference:
      warned = True
      ratio = f"{loss / first_loss:.3g}x" if first_loss > 0 else "far above"
      warnings.warn(DivergenceWarning(
          f"The training loss is {loss:.4g} in round {r + 1}, {ratio} its first value "
          f"({first_loss:.4g}, round {start_round + 1}): the model is diverging. Lower the client learning rate "
          "(LocalTraining's optimizer) or clip gradients (optax.clip_by_global_norm). run_rounds warns above "
          f"divergence={divergence:g}x the first loss; divergence=None turns this warning off."), stacklevel=2)
    rec = {"round": r + 1, **_to_python(metrics), "client_ids": ids.tolist()}
    rec.update(train_loss=loss, num_examples=int(metrics["num_examples"]), bytes_up=int(metrics["bytes_up"]),
               bytes_down=int(metrics["bytes_down"]), wall_s=wall, compile_s=compile_s,
               examples_per_s=float(metrics["num_examples"]) / max(wall, 1e-9))
    up_total += rec["bytes_up"]
    down_total += rec["bytes_down"]
    rec.update(mb_up_total=up_total / 1e6, mb_down_total=down_total / 1e6)
    if round_metrics is not None:
      rec.update(round_metrics(r + 1))
    if state_metrics is not None:
      rec.update(_to_python(state_metrics(r + 1, state)))
    last = r == start_round + rounds - 1
    if evaluate_fn is not None and ((r + 1) % eval_every == 0 or last):
      rec.update({f"test_{k}": v for k, v in evaluate_fn(state).items()})
    history.append(rec)
    if on_round is not None:
      on_round(rec, state)
  return state, history

