"""Epsilon of DP-FedAvg after some rounds, and the noise multiplier for a target epsilon (dp-accounting).

A round samples the cohort either with Poisson sampling (each client independently with probability
q = cohort / population) or as a fixed-size sample without replacement (what ``sample_clients`` does; RDP
with the replace-one neighbouring relation), and releases one Gaussian mechanism with the noise multiplier.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import pld, rdp

__all__ = ["dp_event", "epsilon", "calibrate_noise_multiplier", "ACCOUNTANTS", "SAMPLINGS"]

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


def dp_event(noise_multiplier: float, population: int, cohort_size: int, rounds: int,
             sampling: str = "poisson") -> dp_accounting.DpEvent:
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
  if not 1 <= cohort_size <= population:
    raise ValueError(f"Need 1 <= cohort_size <= population, got {cohort_size}, {population}.")
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling == "poisson":
    one = dp_accounting.PoissonSampledDpEvent(cohort_size / population, gaussian)
  else:
    one = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort_size, gaussian)
  return dp_accounting.SelfComposedDpEvent(one, rounds)


def _accountant(accountant: str, sampling: str):
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
  if accountant == "rdp":
    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return rdp.RdpAccountant(neighboring_relation=relation)
  if sampling == "fixed":
    raise ValueError("The PLD accountant does not support fixed-size sampling; use accountant='rdp' or "
                     "sampling='poisson'.")
  return pld.PLDAccountant()


def epsilon(noise_multiplier: float, population: int, cohort_size: int, rounds: int, delta: float,
            accountant: str = "rdp", sampling: str = "poisson") -> float:
  """Epsilon at ``delta`` after ``rounds`` rounds (inf for noise_multiplier 0; 0 for no rounds)."""
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return float("inf")
  acc = _accountant(accountant, sampling)
  acc.compose(dp_event(noise_multiplier, population, cohort_size, rounds, sampling))
  return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, population: int, cohort_size: int, rounds: int,
                               delta: float, accountant: str = "rdp", sampling: str = "poisson",
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
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant, sampling),
      lambda z: dp_event(z, population, cohort_size, rounds, sampling),
      target_epsilon, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)))
