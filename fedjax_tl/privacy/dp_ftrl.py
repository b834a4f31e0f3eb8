"""DP-FTRL for federated learning: clip, sum, add matrix-factorization noise correlated across rounds.

The matrix mechanism (Denisov et al. 2022; Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization
Mechanisms for Private Machine Learning"; Kairouz et al. 2021, "Practical and Private (Deep) Learning without
Sampling or Shuffling"), as Gboard trains its DP language models. Round t's clipped sum x_t (every client's
update clipped to L2 norm ``clip``) is released as

    x_t + sigma * (C^-1 Z)_t,      Z_t ~ N(0, I) i.i.d.,      sigma = noise_multiplier * clip * s,

with C an n x n lower-triangular Toeplitz *strategy* matrix (jax-privacy's banded Toeplitz or buffered
linear Toeplitz (BLT) strategies) and s its sensitivity under the *participation schema*: every client takes
part at most once every ``min_sep`` rounds and at most ``max_participations`` times (``s`` is max ||C u||_2
over the schema's participation vectors u in {0,1}^n, computed by jax-privacy). The released stream is a
post-processing of C x + sigma Z, one Gaussian mechanism (also when x_t depends on the rounds released before
it, as FL's updates do, C being lower-triangular: Denisov et al. 2022), so no sampling assumption is needed, only
the schema, which :class:`ParticipationSampler` guarantees and :class:`DPFTRL` enforces (a client that would
break it is dropped from the round, counted in ``dp_schema_dropped``). C^-1 Z is generated streaming, one
round at a time: the aggregator state holds (bands - 1) or (number of BLT buffers) model-sized buffers.

Privacy: one Gaussian mechanism of multiplier z = ``noise_multiplier`` under **zero-out** neighbouring (one
client's data replaced by data whose updates are zero: its clipped contribution to each round it takes part in
moves by <= clip) or z / 2 under **replace-one** (its data replaced arbitrarily: <= 2 clip, the relation the
library's DP-FedAvg accounting uses, so the two can be compared; the default). Epsilon is the Gaussian
mechanism's exact (Balle & Wang 2018) value from dp-accounting. After t < n rounds the release is the leading
t x t block, so epsilon(t) uses the multiplier z * s_n / s_t.

Composes with any server optimizer and any update transform before the aggregator (post-processing / the
bound holds for what is sent); refuses a non-uniform weighting, more rounds than it was built for, and (through
``covers_model_state = False``) BatchNorm statistics averaged in the clear.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.aggregators.base import client_weight, mean_of
from fedjax_tl.privacy._deps import jax_privacy
from fedjax_tl.transforms.privacy import clip_by_norm

__all__ = ["MFStrategy", "DPFTRL", "ParticipationSampler", "participation_violations", "NEIGHBOURING",
           "SCHEMAS"]

NEIGHBOURING = ("replace-one", "zero-out")
SCHEMAS = ("cyclic", "random")


def _true_max_participations(rounds: int, min_sep: int, max_participations: int | None) -> int:
  """The most times a client can take part in ``rounds`` rounds under the schema (ceil(n / b), capped by k)."""
  k = -(-rounds // min_sep)
  return k if max_participations is None else min(k, max_participations)


@dataclasses.dataclass(frozen=True)
class MFStrategy:
  """A lower-triangular Toeplitz strategy matrix C of the matrix mechanism (hashable: a value).

  ``kind`` "toeplitz": C's first column starts with ``coefs`` and is 0 below (banded with ``len(coefs)`` bands,
  the BandMF strategies of McKenna et al. 2024); "blt": a buffered linear Toeplitz matrix (Dvijotham et al.
  2024), C[i, j] = 1 for i = j and sum_k output_scale[k] * buf_decay[k]^(i - j - 1) below, whose inverse needs
  only ``len(buf_decay)`` buffers at any number of rounds. Build with :meth:`banded`, :meth:`blt`,
  :meth:`identity` (i.i.d. noise: DP-SGD without sampling) or :meth:`toeplitz`.
  """

  kind: str
  coefs: tuple[float, ...] = ()
  buf_decay: tuple[float, ...] = ()
  output_scale: tuple[float, ...] = ()

  def __post_init__(self):
    if self.kind == "toeplitz":
      if not self.coefs or not self.coefs[0] > 0 or not all(math.isfinite(c) for c in self.coefs):
        raise ValueError(f"A Toeplitz strategy needs finite coefficients with coefs[0] > 0, got {self.coefs}.")
    elif self.kind == "blt":
      if not self.buf_decay or len(self.buf_decay) != len(self.output_scale):
        raise ValueError(f"A BLT strategy needs as many buf_decay as output_scale values (at least one), got "
                         f"{self.buf_decay} and {self.output_scale}.")
    else:
      raise ValueError(f"kind must be 'toeplitz' or 'blt', got {self.kind!r}.")

  # ---- constructors (jax-privacy's optimizers) ----
  @classmethod
  def identity(cls) -> MFStrategy:
    """C = I: independent noise every round (DP-SGD without sampling amplification)."""
    return cls("toeplitz", (1.0,))

  @classmethod
  def toeplitz(cls, coefs) -> MFStrategy:
    """A Toeplitz strategy from the leading coefficients of C's first column."""
    return cls("toeplitz", tuple(float(c) for c in np.asarray(coefs, np.float64).reshape(-1)))

  @classmethod
  def banded(cls, rounds: int, bands: int, optimizer_steps: int = 250) -> MFStrategy:
    """The banded Toeplitz strategy with ``bands`` bands that minimises the mean squared error of the prefix sums
    over ``rounds`` rounds (jax-privacy's ``toeplitz.optimize_banded_toeplitz``; best with bands <= min_sep)."""
    if not 1 <= bands <= rounds:
      raise ValueError(f"Need 1 <= bands <= rounds, got bands={bands}, rounds={rounds}.")
    if bands == 1:
      return cls.identity()
    toeplitz = jax_privacy("matrix_factorization.toeplitz")
    coefs = toeplitz.optimize_banded_toeplitz(n=rounds, bands=bands, max_optimizer_steps=optimizer_steps)
    return cls.toeplitz(np.asarray(coefs))

  @classmethod
  def blt(cls, rounds: int, min_sep: int = 1, max_participations: int | None = None, max_buffers: int = 8,
          error: str = "max") -> MFStrategy:
    """The BLT strategy that minimises the ``error`` ("max" or "mean") squared error of the prefix sums over
    ``rounds`` rounds under (min_sep, max_participations) participation (jax-privacy's
    ``buffered_toeplitz.optimize``, in float64)."""
    if rounds < 1 or min_sep < 1:
      raise ValueError(f"Need rounds >= 1 and min_sep >= 1, got {rounds}, {min_sep}.")
    bt = jax_privacy("matrix_factorization.buffered_toeplitz")
    blt = bt.optimize(n=rounds, min_sep=min_sep, max_participations=max_participations, max_buffers=max_buffers,
                      error=error)
    return cls("blt", buf_decay=tuple(float(v) for v in np.asarray(blt.buf_decay)),
               output_scale=tuple(float(v) for v in np.asarray(blt.output_scale)))

  # ---- the matrix ----
  @property
  def bands(self) -> int | None:
    """Number of bands of a Toeplitz strategy (None for a BLT, which is not banded)."""
    return len(self.coefs) if self.kind == "toeplitz" else None

  def toeplitz_coefs(self, n: int) -> np.ndarray:
    """C's first column for ``n`` rounds (float64)."""
    if self.kind == "toeplitz":
      out = np.zeros(n)
      c = np.asarray(self.coefs[:n])
      out[: len(c)] = c
      return out
    d, s = np.asarray(self.buf_decay), np.asarray(self.output_scale)
    return np.concatenate([[1.0], (d[None, :] ** np.arange(n - 1)[:, None] * s).sum(1)])[:n]

  def matrix(self, n: int) -> np.ndarray:
    """C for ``n`` rounds, dense (float64 numpy; for checks and small n)."""
    c = self.toeplitz_coefs(n)
    i, j = np.indices((n, n))
    return np.where(i >= j, c[np.clip(i - j, 0, n - 1)], 0.0)

  def noising_matrix(self):
    """C^-1 as jax-privacy's ``StreamingMatrix`` (float32): ``init_multiply(template)`` and
    ``multiply_next(z_t, state) -> ((C^-1 z)_t, state)``, one round at a time."""
    if self.kind == "toeplitz":
      return jax_privacy("matrix_factorization.toeplitz").inverse_as_streaming_matrix(
          np.asarray(self.coefs, np.float32))
    bt = jax_privacy("matrix_factorization.buffered_toeplitz")  # (numpy parameters: constants when traced)
    return bt.StreamingMatrixBuilder(buf_decay=np.asarray(self.buf_decay, np.float32),
                                     output_scale=np.asarray(self.output_scale, np.float32)).build_inverse()

  def sensitivity(self, rounds: int, min_sep: int = 1, max_participations: int | None = None) -> float:
    """max ||C u||_2 over participation vectors u in {0,1}^rounds with entries >= ``min_sep`` apart and at most
    ``max_participations`` ones: what one client's unit contributions can move C x by."""
    return _sensitivity(self, rounds, min_sep, max_participations)

  def describe(self) -> str:
    if self.kind == "blt":
      return f"BLT with {len(self.buf_decay)} buffers"
    return "identity (independent noise)" if len(self.coefs) == 1 else f"banded Toeplitz, {len(self.coefs)} bands"


@functools.lru_cache(maxsize=256)
def _sensitivity(strategy: MFStrategy, rounds: int, min_sep: int, max_participations: int | None) -> float:
  """jax-privacy's min-sep sensitivity: exact for non-negative, non-increasing Toeplitz coefficients (McKenna
  et al. 2024, Thm. 2: the worst case is k participations exactly min_sep apart), else its general upper bound
  (Choquette-Choo et al. 2023, Alg. 4). In float64."""
  if rounds < 1 or min_sep < 1:
    raise ValueError(f"Need rounds >= 1 and min_sep >= 1, got {rounds}, {min_sep}.")
  if max_participations is not None and max_participations < 1:
    raise ValueError(f"max_participations must be >= 1 (or None), got {max_participations}.")
  toeplitz = jax_privacy("matrix_factorization.toeplitz")
  sens = jax_privacy("matrix_factorization.sensitivity")
  coefs = strategy.toeplitz_coefs(rounds)
  with jax.enable_x64(True):
    if np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0):
      sq = toeplitz.minsep_sensitivity_squared(jnp.asarray(coefs), min_sep=min_sep,
                                               max_participations=max_participations, n=rounds)
      return float(np.sqrt(float(sq)))
    return float(sens.get_min_sep_sensitivity_upper_bound(jnp.asarray(strategy.matrix(rounds)), min_sep,
                                                          max_participations))


def _standard_normal(key, tree):
  """Independent N(0, 1) float32 draws shaped like ``tree``, one key per leaf (split from ``key``)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)])


@dataclasses.dataclass(frozen=True)
class DPFTRL:
  """DP-FTRL as FedAvg's aggregator (``FedAvg(aggregator=DPFTRL(...))``): clip, sum, matrix-factorization noise.

  Attributes:
    clip: the L2 norm every client's update is clipped to.
    noise_multiplier: z; the noise on round t's sum is z * clip * s * (C^-1 Z)_t (s: ``sensitivity``).
    strategy: the strategy matrix C (:class:`MFStrategy`).
    rounds: n, the rounds the mechanism is built and accounted for (running more is refused).
    population: the number of clients (ids 0..population-1), for the schema guard's per-client record.
    min_sep: b, every client takes part at most once every b rounds (1: no separation).
    max_participations: k, at most k times (None: ceil(n / b)).
    neighbouring: "replace-one" (sensitivity 2 clip per participation, as DP-FedAvg's accounting here) or
      "zero-out" (clip per participation).

  The mean divides the noisy sum by the cohort's client count (public under the schema). Per-client metrics:
  ``dp_within_clip``, ``dp_schema_ok`` (the client respected the schema and was used); round metric
  ``dp_schema_dropped`` (clients dropped because the sampler broke the schema: nonzero means the run's sampler
  is not a :class:`ParticipationSampler` of this schema; the guarantee still holds, as they were not used).
  """

  clip: float
  noise_multiplier: float
  strategy: MFStrategy
  rounds: int
  population: int
  min_sep: int = 1
  max_participations: int | None = None
  neighbouring: str = "replace-one"
  weighting: str = "uniform"

  covers_model_state = False  # averaged BatchNorm statistics would bypass the clip and the noise

  def __post_init__(self):
    if self.weighting != "uniform":
      raise ValueError(f"DP-FTRL's sensitivity bound needs weighting='uniform' (every client's clipped update "
                       f"counts once), got weighting={self.weighting!r}.")
    if not self.clip > 0 or not math.isfinite(self.clip):
      raise ValueError(f"DP-FTRL needs a finite clip > 0, got {self.clip}.")
    if not self.noise_multiplier >= 0:
      raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.")
    if not isinstance(self.strategy, MFStrategy):
      raise TypeError(f"strategy must be an MFStrategy, got {type(self.strategy).__name__}.")
    if self.rounds < 1 or self.population < 1 or self.min_sep < 1:
      raise ValueError(f"Need rounds, population and min_sep >= 1, got {self.rounds}, {self.population}, "
                       f"{self.min_sep}.")
    if self.max_participations is not None and self.max_participations < 1:
      raise ValueError(f"max_participations must be >= 1 (or None), got {self.max_participations}.")
    if self.neighbouring not in NEIGHBOURING:
      raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {self.neighbouring!r}.")
    # on construction (host, float64), never while decode is traced
    object.__setattr__(self, "_sens", self.strategy.sensitivity(self.rounds, self.min_sep,
                                                                        self.max_participations))

  # ---- calibration and accounting ----
  @property
  def participations(self) -> int:
    """k: the most times one client can take part in the planned rounds."""
    return _true_max_participations(self.rounds, self.min_sep, self.max_participations)

  @property
  def sensitivity(self) -> float:
    """s: the strategy's sensitivity over the planned rounds under the schema (per unit contribution)."""
    return self._sens

  @property
  def noise_std(self) -> float:
    """Standard deviation of the noise z on each coordinate of the sum, z * clip * s, before C^-1 mixes it."""
    return self.noise_multiplier * self.clip * self.sensitivity

  def _multiplier(self, rounds: int | None) -> float:
    t = self.rounds if rounds is None else rounds
    if not 0 <= t <= self.rounds:
      raise ValueError(f"This DP-FTRL was built for {self.rounds} rounds; its epsilon after {t} rounds is not "
                       "defined. Build it with rounds >= the rounds you run.")
    if t == 0:
      return math.inf
    scale = self.sensitivity / (self.sensitivity if t == self.rounds else self._partial_sensitivity(t))
    return self.noise_multiplier * scale / (2.0 if self.neighbouring == "replace-one" else 1.0)

  def _partial_sensitivity(self, t: int) -> float:
    """s_t, the sensitivity of C's leading t x t block (for epsilon after t rounds, e.g. every round's record).
    For non-negative, non-increasing coefficients the worst pattern is min(k, ceil(t / b)) participations exactly
    b apart from round 0 (McKenna et al. 2024, Thm. 2, what jax-privacy computes for the planned rounds; the two
    agree, tests/test_dp_ftrl.py), evaluated here in numpy: jax-privacy would compile anew for every t."""
    coefs = self.strategy.toeplitz_coefs(t)
    if not (np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0)):
      return self.strategy.sensitivity(t, self.min_sep, self.max_participations)
    u = np.zeros(t)
    u[: self.min_sep * _true_max_participations(t, self.min_sep, self.max_participations): self.min_sep] = 1.0
    return float(np.linalg.norm(self.strategy.matrix(t) @ u))

  def dp_event(self, rounds: int | None = None) -> dp_accounting.DpEvent:
    """The first ``rounds`` rounds (default all) as dp-accounting's event: one Gaussian mechanism whose multiplier
    is taken relative to the neighbouring relation's sensitivity (already halved for replace-one)."""
    return dp_accounting.GaussianDpEvent(self._multiplier(rounds))

  def epsilon(self, delta: float, rounds: int | None = None) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (default: the planned rounds); exact for the Gaussian."""
    if not 0 < delta < 1:
      raise ValueError(f"delta must be in (0, 1), got {delta}.")
    mult = self._multiplier(rounds)
    if mult == math.inf:
      return 0.0
    if mult == 0:
      return math.inf
    return float(dp_accounting.get_epsilon_gaussian(mult, delta))

  @classmethod
  def calibrated(cls, target_epsilon: float, delta: float, *, clip: float, strategy: MFStrategy, rounds: int,
                 population: int, min_sep: int = 1, max_participations: int | None = None,
                 neighbouring: str = "replace-one") -> DPFTRL:
    """The DP-FTRL whose planned rounds spend exactly ``target_epsilon`` at ``delta``."""
    if not target_epsilon > 0 or not 0 < delta < 1:
      raise ValueError(f"Need target epsilon > 0 and delta in (0, 1), got {target_epsilon}, {delta}.")
    if neighbouring not in NEIGHBOURING:
      raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}.")
    sigma = float(dp_accounting.get_sigma_gaussian(target_epsilon, delta))
    z = sigma * (2.0 if neighbouring == "replace-one" else 1.0)
    return cls(clip, z, strategy, rounds, population, min_sep, max_participations, neighbouring)

  def describe(self) -> str:
    k = "" if self.max_participations is None else f", at most {self.max_participations} times"
    return (f"DP-FTRL ({self.strategy.describe()}): clip {self.clip}, noise multiplier {self.noise_multiplier:.4f}, "
            f"sensitivity {self.sensitivity:.4f} over {self.rounds} rounds (each client at most once every "
            f"{self.min_sep} rounds{k}; up to {self.participations} participations), {self.neighbouring}")

  # ---- the aggregator protocol ----
  @property
  def _independent(self) -> bool:
    """C = c I: no state to stream (and jax-privacy's would be zero-sized buffers, which checkpoints refuse)."""
    return self.strategy.kind == "toeplitz" and len(self.strategy.coefs) == 1

  def init(self, template):
    n = self.population
    noise = None if self._independent else self.strategy.noising_matrix().init_multiply(
        jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), template))
    return {"noise": noise, "round": jnp.zeros((), jnp.int32),
            "last": jnp.full((n,), -(2 ** 30), jnp.int32), "count": jnp.zeros((n,), jnp.int32)}

  def setup(self, state, num_clients, padded, max_weight, key):
    del num_clients, padded, max_weight, key
    t = int(state["round"])
    if t >= self.rounds:
      raise ValueError(f"DP-FTRL was built (and its noise calibrated) for {self.rounds} rounds; round {t + 1} is "
                       "beyond its privacy accounting. Build it with rounds >= the rounds you run.")
    return None, None

  def _eligible(self, client_id, state):
    row = jnp.clip(client_id, 0, self.population - 1)
    ok = (client_id >= 0) & (client_id < self.population)
    ok &= state["round"] - state["last"][row] >= self.min_sep
    if self.max_participations is not None:
      ok &= state["count"][row] < self.max_participations
    return ok

  def encode(self, delta, num_examples, state, shared, ctx):
    del shared
    clipped, norm = clip_by_norm(delta, self.clip)
    ok = self._eligible(ctx.client_id, state)
    message = jax.tree.map(lambda d: jnp.where(ok, d, jnp.zeros_like(d)), clipped)
    weight = client_weight("uniform", num_examples, ctx.client_id)
    return message, weight, {"dp_within_clip": (norm <= self.clip).astype(jnp.float32),
                             "dp_schema_ok": ok.astype(jnp.float32), "dp_client": ctx.client_id.astype(jnp.int32)}

  def aggregate(self, message_sum, weight_sum, shared, host):
    del shared, host
    return message_sum, weight_sum, {}

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    z = _standard_normal(key, total)
    if self._independent:
      noise, noise_state = jax.tree.map(lambda e: e / self.strategy.coefs[0], z), None
    else:
      noise, noise_state = self.strategy.noising_matrix().multiply_next(z, state["noise"])
    std = self.noise_std
    if std > 0:
      total = jax.tree.map(lambda x, e: x + std * e, total, noise)
    used = (client_metrics["dp_schema_ok"] * real) > 0
    rows = jnp.where(used, client_metrics["dp_client"], self.population)  # out of range: dropped by the scatter
    t = state["round"]
    new = {"noise": noise_state, "round": t + 1, "last": state["last"].at[rows].set(t, mode="drop"),
           "count": state["count"].at[rows].add(1, mode="drop")}
    dropped = (real * (1.0 - client_metrics["dp_schema_ok"])).sum()
    return mean_of(total, weight_sum), new, {"dp_schema_dropped": dropped}

  def bits(self, template):
    del template
    return None


# ---- participation schemas ----
@dataclasses.dataclass(frozen=True)
class ParticipationSampler:
  """A cohort sampler that never breaks a participation schema; pass as ``run_rounds(..., sampler=...)``.

  ``schema`` "cyclic": the population is split once (seeded permutation) into ``min_sep`` groups of nearly
  equal size and round r draws from group r mod min_sep, so every client takes part exactly once every
  ``min_sep`` rounds ((k, b)-participation, as in Gboard's DP-FTRL); with ``cohort_size`` only that many of the
  group, uniformly. "random": each round ``cohort_size`` clients uniformly among those that did not take part
  in the last ``min_sep - 1`` rounds. Both leave out clients that reached ``max_participations``.

  The cohort of round r is a function of (``seed``, r) only: the key ``run_rounds`` passes is ignored, and the
  rounds before r are replayed (cached) so that a resumed run gets the same cohorts. Raises, naming the round
  and the fix, when the schema leaves fewer eligible clients than the cohort needs.
  """

  num_clients: int
  min_sep: int
  cohort_size: int | None = None
  max_participations: int | None = None
  schema: str = "cyclic"
  seed: int = 0

  def __post_init__(self):
    if self.schema not in SCHEMAS:
      raise ValueError(f"schema must be one of {SCHEMAS}, got {self.schema!r}.")
    if self.num_clients < 1 or self.min_sep < 1:
      raise ValueError(f"Need num_clients >= 1 and min_sep >= 1, got {self.num_clients}, {self.min_sep}.")
    if self.max_participations is not None and self.max_participations < 1:
      raise ValueError(f"max_participations must be >= 1 (or None), got {self.max_participations}.")
    if self.cohort_size is not None and self.cohort_size < 1:
      raise ValueError(f"cohort_size must be >= 1 (or None), got {self.cohort_size}.")
    if self.schema == "cyclic":
      if self.min_sep > self.num_clients:
        raise ValueError(f"A cyclic schema splits the {self.num_clients} clients into min_sep={self.min_sep} "
                         "groups: it needs min_sep <= num_clients.")
      smallest = self.num_clients // self.min_sep
      if self.cohort_size is not None and self.cohort_size > smallest:
        raise ValueError(f"cohort_size={self.cohort_size} is more than the smallest of the {self.min_sep} cyclic "
                         f"groups ({smallest} of {self.num_clients} clients): lower cohort_size or min_sep.")
    else:
      if self.cohort_size is None:
        raise ValueError("The 'random' schema needs cohort_size.")
      if self.cohort_size * self.min_sep > self.num_clients:
        raise ValueError(f"cohort_size={self.cohort_size} clients per round, each then resting {self.min_sep - 1} "
                         f"rounds, needs at least cohort_size * min_sep = {self.cohort_size * self.min_sep} "
                         f"clients; there are {self.num_clients}. Lower cohort_size or min_sep.")
    groups = None
    if self.schema == "cyclic":
      perm = np.random.default_rng([self.seed, 0x5EED]).permutation(self.num_clients)
      groups = [np.sort(g) for g in np.array_split(perm, self.min_sep)]
    object.__setattr__(self, "_groups", groups)
    object.__setattr__(self, "_cohorts", [])
    object.__setattr__(self, "_last", np.full(self.num_clients, -(2 ** 30), np.int64))
    object.__setattr__(self, "_count", np.zeros(self.num_clients, np.int64))

  def __call__(self, key, round_idx: int) -> np.ndarray:
    del key  # the schedule is a function of the sampler's own seed (replayable on resume)
    return self.cohort(round_idx)

  def cohort(self, round_idx: int) -> np.ndarray:
    """The client ids of round ``round_idx`` (0-based), sorted."""
    if round_idx < 0:
      raise ValueError(f"round index must be >= 0, got {round_idx}.")
    while len(self._cohorts) <= round_idx:
      self._cohorts.append(self._next(len(self._cohorts)))
    return self._cohorts[round_idx].copy()

  def schedule(self, rounds: int) -> list[np.ndarray]:
    """The cohorts of rounds 0..rounds-1."""
    return [self.cohort(r) for r in range(rounds)]

  def _next(self, r: int) -> np.ndarray:
    ok = (r - self._last >= self.min_sep)
    if self.max_participations is not None:
      ok &= self._count < self.max_participations
    if self.schema == "cyclic":
      group = self._groups[r % self.min_sep]
      eligible = group[ok[group]]
    else:
      eligible = np.flatnonzero(ok)
    need = len(eligible) if self.cohort_size is None else self.cohort_size
    if need == 0 or len(eligible) < need:
      raise ValueError(f"Round {r + 1}: the participation schema ({self.describe()}) leaves {len(eligible)} "
                       f"eligible clients, fewer than the {max(need, 1)} the round needs (clients reached "
                       "max_participations). Run fewer rounds, or raise max_participations or the population.")
    rng = np.random.default_rng([self.seed, r])
    ids = eligible if self.cohort_size is None else rng.choice(eligible, size=need, replace=False)
    ids = np.sort(np.asarray(ids, np.int64))
    self._last[ids] = r
    self._count[ids] += 1
    return ids

  def describe(self) -> str:
    k = "" if self.max_participations is None else f", at most {self.max_participations} times"
    if self.schema == "cyclic":
      size = "the whole group" if self.cohort_size is None else f"{self.cohort_size} of its group"
      return (f"cyclic: {self.num_clients} clients in {self.min_sep} fixed groups, round r takes {size} r mod "
              f"{self.min_sep} (each client at most once every {self.min_sep} rounds{k})")
    return (f"random: {self.cohort_size} of the {self.num_clients} clients that did not take part in the last "
            f"{self.min_sep - 1} rounds, uniformly (each client at most once every {self.min_sep} rounds{k})")


def participation_violations(cohorts, min_sep: int, max_participations: int | None = None) -> list[str]:
  """Every breach of (min_sep, max_participations) in a sequence of cohorts (round r: ``cohorts[r]``), as text;
  empty when the schema holds. A client listed twice in one round is a breach as well."""
  last, count, out = {}, {}, []
  for r, ids in enumerate(cohorts):
    ids = [int(c) for c in np.asarray(ids).reshape(-1)]
    if len(set(ids)) != len(ids):
      out.append(f"round {r + 1}: a client appears more than once")
    for c in set(ids):
      if c in last and r - last[c] < min_sep:
        out.append(f"round {r + 1}: client {c} again after {r - last[c]} rounds (min_sep {min_sep})")
      count[c] = count.get(c, 0) + 1
      if max_participations is not None and count[c] > max_participations:
        out.append(f"round {r + 1}: client {c} takes part for the {count[c]}th time (max {max_participations})")
      last[c] = r
  return out
