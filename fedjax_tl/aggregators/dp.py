"""Differential privacy as aggregators: DP-FedAvg with a fixed clip, and with adaptive clipping.

**DP-FedAvg** (:class:`DPFedAvg`; McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): every client's update is clipped to a fixed L2 norm, the mean is uniform over the cohort, and Gaussian
noise calibrated to the clip and the cohort size is added to it. Account with :mod:`fedjax_tl.privacy.accounting`.

**Adaptive clipping** (:class:`AdaptiveClipping`; Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping").

The clip norm C is server state, sent to the cohort with the model. Each client clips its delta to C and
also reports the bit b_i = [||delta_i|| <= C]. The server adds Gaussian noise to the sum of the bits
(std ``count_stddev``, the paper's sigma_b, default m / 20) and to the uniformly weighted mean of the deltas
(std z_delta * C / m), then moves C geometrically towards the ``target_quantile`` gamma of the clients' norms:

    b_mean = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,        C <- C * exp(-clip_lr * (b_mean - gamma)).

The released count is centred (b_i - 1/2, as in the paper) so that adding or removing a client moves it by at
most 1/2; replacing one moves it by at most 1 (and the deltas' sum by 2C), which halves every multiplier alike.

Splitting the privacy budget between the two releases: with the overall ``noise_multiplier`` z the deltas get
z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Theorem 1 of the paper), so the pair costs what one Gaussian
mechanism with multiplier z costs under either neighbouring relation, and the accountant
(``fedjax_tl.privacy.accounting``, which applies the replace-one factor itself) is used with z unchanged.
Use as FedAvg's aggregator: ``FedAvg(local, aggregator=AdaptiveClipping(...))``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_tl.aggregators.base import SUM, Mean, Message, RoundInfo, client_weight, mean_of
from fedjax_tl.transforms.privacy import add_noise, clip_by_norm
from fedjax_tl.types import PRNGKey, Updates

__all__ = ["DPFedAvg", "AdaptiveClipping"]


def _noise_mean(mean, std, cohort_size, key):
  """N(0, std^2) on the mean; of a :class:`Message`, on its ``mean`` part with ``key`` (as a bare delta) and
  N(0, (std * cohort_size)^2) on its ``sum`` part (the sum of the same clipped messages, not divided by the
  cohort), so the whole message gets the Gaussian mechanism of its joint clip."""
  if isinstance(mean, Message):
    summed = add_noise(mean.sum, std * cohort_size, jax.random.fold_in(key, 1)) if jax.tree.leaves(mean.sum) else \
        mean.sum
    return Message(add_noise(mean.mean, std, key), summed)
  return add_noise(mean, std, key)


@dataclasses.dataclass(frozen=True)
class DPFedAvg:
  """DP-FedAvg with a fixed clip (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models"): every client's update is clipped to L2 norm ``clip`` (after the update transforms, so the bound
  holds for what is sent), the mean is uniform over the cohort, and it gets N(0, (noise_multiplier * clip /
  cohort_size)^2) noise on every coordinate (the aggregator key). ``clip = inf`` and ``noise_multiplier = 0``
  is plain uniform FedAvg. Account with :mod:`fedjax_tl.privacy.accounting`."""

  clip: float = 1.0
  noise_multiplier: float = 0.0
  cohort_size: int = 1
  weighting: str = "uniform"

  def __post_init__(self):
    if self.weighting != "uniform":
      raise ValueError("DP-FedAvg's sensitivity bound needs weighting='uniform'.")
    if not self.clip > 0 or self.noise_multiplier < 0 or self.cohort_size < 1:
      raise ValueError(f"Need clip > 0, noise_multiplier >= 0 and cohort_size >= 1, got {self.clip}, "
                       f"{self.noise_multiplier}, {self.cohort_size}.")

  _MEAN = Mean("uniform")
  reducer = SUM
  takes_message = True  # clips the delta and the hooks' message jointly, noises both
  covers_model_state = True  # BatchNorm statistics averaged beside it are neither clipped nor noised

  def init(self, template):
    return self._MEAN.init(template)

  def setup(self, state, num_clients, padded, max_examples, key):
    return self._MEAN.setup(state, num_clients, padded, max_examples, key)

  def encode(self, delta, num_examples, state, shared, ctx):
    clipped, norm = clip_by_norm(delta, self.clip)
    delta, weight, _ = self._MEAN.encode(clipped, num_examples, state, shared, ctx)
    return delta, weight, {"dp_within_clip": (norm <= self.clip).astype(jnp.float32)}

  def aggregate(self, message_sum, weight_sum, shared, host):
    return self._MEAN.aggregate(message_sum, weight_sum, shared, host)

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    mean, state, metrics = self._MEAN.decode(total, weight_sum, state, client_metrics, real, key)
    if self.noise_multiplier > 0:
      mean = _noise_mean(mean, self.noise_multiplier * self.clip / self.cohort_size, self.cohort_size, key)
    return mean, state, metrics

  def bits(self, template):
    return self._MEAN.bits(template)


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
  """DP-FedAvg whose clip norm (the aggregator state) tracks a quantile of the clients' update norms (module
  docstring: the update of the norm and the split of the privacy budget).

  Attributes:
    noise_multiplier: z, the overall noise multiplier (what the accountant sees); 0 disables the noise.
    cohort_size: m, the (expected) number of clients per round.
    initial_clip: C at round 0.
    target_quantile: gamma, the fraction of clients whose update should fall within the clip.
    clip_lr: eta_C of the geometric update.
    count_stddev: sigma_b; default m / 20 (the paper's recommendation). Needs 2 sigma_b > z when z > 0.
  """

  noise_multiplier: float
  cohort_size: int
  initial_clip: float = 0.1
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  count_stddev: float | None = None

  def __post_init__(self):
    if self.cohort_size < 1:
      raise ValueError(f"cohort_size must be >= 1, got {self.cohort_size}.")
    if not self.initial_clip > 0:
      raise ValueError(f"initial_clip must be > 0, got {self.initial_clip}.")
    if not 0 <= self.target_quantile <= 1:
      raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}.")
    if self.noise_multiplier < 0:
      raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.")
    if self.noise_multiplier > 0 and not 2 * self.sigma_b > self.noise_multiplier:
      raise ValueError(f"Adaptive clipping needs 2 * count_stddev > noise_multiplier, got count_stddev "
                       f"{self.sigma_b:.4g} and noise_multiplier {self.noise_multiplier}: raise count_stddev "
                       f"(or the cohort size; its default is cohort_size / 20).")

  @property
  def sigma_b(self) -> float:
    return self.cohort_size / 20 if self.count_stddev is None else self.count_stddev

  @property
  def delta_noise_multiplier(self) -> float:
    """z_delta, the noise multiplier of the deltas once the count has taken its share."""
    z = self.noise_multiplier
    if z == 0:
      return 0.0
    return (z ** -2 - (2 * self.sigma_b) ** -2) ** -0.5

  # ---- the aggregator protocol (fedjax_tl.aggregators.base): the state is the clip norm ----
  reducer = SUM
  takes_message = True  # as DPFedAvg: clips the delta and the hooks' message jointly, noises both
  covers_model_state = True  # as DPFedAvg: BatchNorm statistics averaged beside it are neither clipped nor noised

  def init(self, template=None) -> jax.Array:
    del template
    return jnp.float32(self.initial_clip)

  def setup(self, state, num_clients, padded, max_examples, key):
    del state, num_clients, padded, max_examples, key
    return None, None

  def encode(self, delta, num_examples, clip_norm, shared, ctx):
    """Clips to the current norm (a Message jointly), weighs every real client of the cohort 1 and sends the bit
    b_i in the wire message's sum part (so whatever encodes the wire, e.g. secure aggregation, covers it too)."""
    del shared
    clipped, below = self.clip(delta, clip_norm)
    if isinstance(clipped, Message):
      wire = Message(clipped.mean, {"hooks": clipped.sum, "below_clip": below})
    else:
      wire = Message(clipped, {"below_clip": below})
    return wire, client_weight("uniform", num_examples, ctx.client_id), {}

  def aggregate(self, message_sum, weight_sum, shared, host):
    del shared, host
    return message_sum, weight_sum, RoundInfo()

  def decode(self, total, weight_sum, clip_norm, client_metrics, real, key):
    below = total.sum["below_clip"]  # real clients within the clip norm (summed over them)
    mean = total.mean if "hooks" not in total.sum else Message(total.mean, total.sum["hooks"])
    noisy, new_clip = self.server_step(mean_of(mean, weight_sum), below, clip_norm, key)
    return noisy, new_clip, {"clip_norm": clip_norm, "clip_fraction_within": below / real.sum()}

  def bits(self, template):
    del template
    return None

  @staticmethod
  def clip(delta: Updates, clip_norm: jax.Array) -> tuple[Updates, jax.Array]:
    """(delta scaled to L2 norm <= clip_norm, 1.0 if it was already within else 0.0) for one client."""
    clipped, norm = clip_by_norm(delta, clip_norm)
    return clipped, (norm <= clip_norm).astype(jnp.float32)

  def server_step(self, mean_delta: Updates, below_count: jax.Array, clip_norm: jax.Array,
                  key: PRNGKey) -> tuple[Updates, jax.Array]:
    """(noisy mean delta, next clip norm) from the uniformly weighted mean of clipped deltas and the number
    of clients that were within the clip."""
    m = self.cohort_size
    k_delta, k_count = jax.random.split(key)
    noisy = _noise_mean(mean_delta, self.delta_noise_multiplier * clip_norm / m, m, k_delta)
    count_noise = self.sigma_b * jax.random.normal(k_count, ()) if self.noise_multiplier > 0 else 0.0
    b_mean = (below_count - m / 2 + count_noise) / m + 0.5  # the centred release
    new_clip = clip_norm * jnp.exp(-self.clip_lr * (b_mean - self.target_quantile))
    return noisy, new_clip.astype(jnp.float32)
