"""Epsilon of DP-FedAvg after some rounds, and the noise multiplier for a target epsilon (dp-accounting).

What is protected: one client's whole contribution. Every client's update is clipped to L2 norm ``C`` and the
server adds Gaussian noise of standard deviation ``z * C`` to the sum of the cohort's clipped updates (``z`` is
the noise multiplier; ``transforms.dp_fedavg`` divides both by the cohort size ``m`` it was given, the fixed
denominator of the uniformly weighted mean). One round samples the cohort in one of two ways, and each comes
with its own neighbouring relation:

* ``"fixed"`` - a fixed-size sample of ``m`` of the ``n`` clients without replacement (what
  :func:`fedjax_tl.core.fedavg.sample_clients` does, so the right choice for the library's rounds). Neighbouring
  populations differ by *replacing* one client (the population size is public). Replacing one clipped update
  moves the sum by up to ``2C``, so the mechanism's noise relative to its sensitivity is ``z / 2``.
  RDP: the sampling-without-replacement bound of Wang, Balle & Kasiviswanathan (2019) on a Gaussian of
  multiplier ``z / 2``. PLD: the dominating pair of Zhu, Dong & Wang (2022, Thm. 11) for sampling without
  replacement under substitution, ``((1 - q) N(0, z^2) + q N(2, z^2), N(0, z^2))`` and its mirror image with
  ``q = m / n``, which is exactly dp-accounting's Poisson-subsampled Gaussian of multiplier ``z / 2`` under
  add/remove (same pair of distributions), so that event is what is composed.
* ``"poisson"`` - every client joins independently with probability ``q = m / n`` (the cohort size varies;
  the mean still divides by ``m``); neighbouring populations differ by *adding or removing* one client, whose
  clipped update moves the sum by up to ``C``: a Poisson-subsampled Gaussian of multiplier ``z``. Valid only
  for rounds whose cohorts are Poisson sampled.

dp-accounting (<= 0.6, google/differential-privacy issue 378) reads a ``GaussianDpEvent``'s multiplier as
noise / sensitivity in its replace-one RDP code, so the sensitivity 2C has to be applied here. An upstream fix
(PR 464) would halve the multiplier itself; :func:`_replace_one_scale` detects which behaviour the installed
version has (one closed-form probe) so that the factor is applied exactly once either way, and the dependency
is pinned below the next minor version as well.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting import pld, rdp

__all__ = ["dp_event", "epsilon", "calibrate_noise_multiplier", "ACCOUNTANTS", "SAMPLINGS"]

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


@functools.cache
def _replace_one_scale() -> float:
  """The factor to apply to z for the replace-one sensitivity 2C before handing it to dp-accounting's RDP code
  for sampling without replacement: 1/2 where it reads z as noise / sensitivity (dp-accounting <= 0.6), 1 where
  it already doubles the sensitivity itself. Probed with q = 1, where its RDP at order 2 must be the Gaussian's
  closed form 2 / (2 sigma^2) with sigma = z (unfixed) or z / 2 (fixed)."""
  acc = rdp.RdpAccountant(orders=[2.0], neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(4, 4, dp_accounting.GaussianDpEvent(1.0)))
  rdp2 = float(acc._rdp[0])  # noqa: SLF001 - the accountant's RDP curve at the one order we asked for
  if math.isclose(rdp2, 1.0, rel_tol=1e-6):
    return 0.5
  if math.isclose(rdp2, 4.0, rel_tol=1e-6):
    return 1.0
  raise RuntimeError(f"dp-accounting {getattr(dp_accounting, '__version__', '?')} gives RDP {rdp2} at order 2 for "
                     "a fully sampled Gaussian of multiplier 1 under replace-one (expected 1 or 4): its "
                     "convention changed; fedjax_tl's accounting cannot be trusted with it. Install "
                     "dp-accounting<0.7.")


def _check(noise_multiplier: float, population: int, cohort_size: int, rounds: int, sampling: str):
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
  if not 1 <= cohort_size <= population:
    raise ValueError(f"Need 1 <= cohort_size <= population, got cohort_size={cohort_size}, "
                     f"population={population}.")
  if rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {rounds}.")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")


def dp_event(noise_multiplier: float, population: int, cohort_size: int, rounds: int,
             sampling: str = "fixed", accountant: str = "rdp") -> dp_accounting.DpEvent:
  """The dp-accounting event of ``rounds`` DP-FedAvg rounds, in the form ``accountant`` composes correctly
  (see the module docstring: for "fixed" the multiplier is taken relative to the replace-one sensitivity 2C)."""
  _check(noise_multiplier, population, cohort_size, rounds, sampling)
  q = cohort_size / population
  if sampling == "poisson":
    one = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
  elif accountant == "pld":  # Zhu, Dong & Wang's dominating pair == Poisson-subsampled Gaussian of z/2
    one = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
  else:
    z = noise_multiplier * _replace_one_scale()
    one = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort_size, dp_accounting.GaussianDpEvent(z))
  return dp_accounting.SelfComposedDpEvent(one, rounds)


def _accountant(accountant: str, sampling: str):
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
  if accountant == "rdp" and sampling == "fixed":
    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  # PLD: both samplings are composed as add/remove events (see dp_event), which also covers the mirror pair.
  return pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def epsilon(noise_multiplier: float, population: int, cohort_size: int, rounds: int, delta: float,
            accountant: str = "rdp", sampling: str = "fixed") -> float:
  """Epsilon at ``delta`` after ``rounds`` rounds (inf for noise_multiplier 0; 0 for no rounds).

  A valid upper bound for the stated sampling and its neighbouring relation (module docstring); "fixed" is
  the sampling of :func:`~fedjax_tl.core.fedavg.sample_clients`.
  """
  _check(noise_multiplier, population, cohort_size, rounds, sampling)
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return float("inf")
  acc = _accountant(accountant, sampling)
  acc.compose(dp_event(noise_multiplier, population, cohort_size, rounds, sampling, accountant))
  return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, population: int, cohort_size: int, rounds: int,
                               delta: float, accountant: str = "rdp", sampling: str = "fixed",
                               max_noise_multiplier: float = 1000.0) -> float:
  """The smallest noise multiplier whose epsilon after ``rounds`` rounds is <= ``target_epsilon``."""
  if not target_epsilon > 0:
    raise ValueError(f"target epsilon must be > 0, got {target_epsilon}.")
  achieved = epsilon(max_noise_multiplier, population, cohort_size, rounds, delta, accountant, sampling)
  if achieved > target_epsilon:
    raise ValueError(
        f"epsilon={target_epsilon} at delta={delta} is out of reach over {rounds} rounds of {cohort_size} of "
        f"{population} clients: even noise multiplier {max_noise_multiplier} gives {achieved:.3g}. Use fewer "
        "rounds, a smaller cohort, more clients, a larger delta or a larger epsilon.")
  if accountant == "pld":
    # PLD's discretisation blows up at tiny multipliers, so bracket its search: RDP's answer is an upper bound
    # (RDP never reports less epsilon than PLD), and the lower end is lowered until it overshoots the target.
    hi = calibrate_noise_multiplier(target_epsilon, population, cohort_size, rounds, delta, "rdp", sampling,
                                    max_noise_multiplier)
    lo = hi / 2
    while lo > 0.05 and epsilon(lo, population, cohort_size, rounds, delta, accountant, sampling) <= target_epsilon:
      hi, lo = lo, lo / 2
    bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
  else:
    bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant, sampling),
      lambda z: dp_event(z, population, cohort_size, rounds, sampling, accountant),
      target_epsilon, delta, bracket_interval=bracket, tol=1e-4))
