"""A run's privacy statement: what is protected, against what, at which cost, checked how, and what is not.

``privacy_statement(algorithm, population=..., rounds=..., delta=...)`` reads the mechanism from the FedAvg
configuration that runs (its aggregator: ``DPFedAvg``, ``AdaptiveClipping``, ``DPFTRL``, an audited one, or
none; or DP-FedAvg as the transform pair, described by ``dp_fedavg=(clip, noise_multiplier, cohort_size)``) and
returns a JSON-able dict for results.json, with a ``text`` rendering for the log. It refuses combinations whose
claim would be false: DP-FedAvg's accounting with a participation-schema sampler (it assumes uniformly sampled
fixed-size cohorts), DP-FTRL with a sampler that is not a :class:`~fedjax_tl.privacy.dp_ftrl.ParticipationSampler`
of its schema.
"""

from __future__ import annotations

import math

__all__ = ["privacy_statement"]

UNIT = ("user = client: everything one client contributes over the whole run (all its examples, in every round "
        "it takes part in)")


def _mechanism(algorithm, dp_fedavg):
  """(kind, aggregator, audited) with kind in {"dp-fedavg", "adaptive", "dp-ftrl", "none"}."""
  from fedjax_tl.aggregators import AdaptiveClipping, DPFedAvg
  from fedjax_tl.privacy.audit import CanaryAggregator
  from fedjax_tl.privacy.dp_ftrl import DPFTRL

  agg = getattr(algorithm, "aggregator", None)  # e.g. Ditto has none (and no DP)
  audited = isinstance(agg, CanaryAggregator)
  if audited:
    agg = agg.inner
  if dp_fedavg is not None:
    if isinstance(agg, DPFTRL | DPFedAvg | AdaptiveClipping):
      raise ValueError(f"dp_fedavg=... describes DP-FedAvg done by transforms, but the aggregator is already a DP "
                       f"mechanism ({type(agg).__name__}): give one of them.")
    return "dp-fedavg", None, audited
  if isinstance(agg, DPFTRL):
    return "dp-ftrl", agg, audited
  if isinstance(agg, DPFedAvg):
    return ("dp-fedavg" if agg.noise_multiplier > 0 else "none"), agg, audited
  if isinstance(agg, AdaptiveClipping):
    return ("adaptive" if agg.noise_multiplier > 0 else "none"), agg, audited
  return "none", agg, audited


def privacy_statement(algorithm, *, population: int, rounds: int, delta: float, sampler=None,
                      accountant: str = "pld", audit: dict | None = None, has_model_state: bool | None = None,
                      dp_fedavg: tuple[float, float, int] | None = None) -> dict:
  """The privacy statement of a run of ``algorithm`` (a FedAvg) over ``rounds`` rounds of ``population`` clients.

  Args:
    population: the clients the cohorts are drawn from (with an audit's canaries: ``data.num_clients`` after
      ``CanaryAudit.attach``).
    rounds: the rounds run (epsilon is what they spent).
    delta: the delta of the (epsilon, delta) claim.
    sampler: the run's ``sampler`` (None: ``run_rounds``' default, fixed-size uniform cohorts).
    accountant: "pld" or "rdp", for DP-FedAvg (:mod:`fedjax_tl.privacy.accounting`).
    audit: :meth:`CanaryAudit.result`'s dict, if the run was audited.
    has_model_state: whether the model has non-param state (BatchNorm statistics); None: unknown.
    dp_fedavg: (clip, noise_multiplier, cohort_size) when DP-FedAvg is done by ``transforms.dp_fedavg``
      (client_transform + server_transform) instead of the ``DPFedAvg`` aggregator.

  Returns a dict: unit, mechanism, neighbouring, sampling, epsilon, delta, accountant, rounds, population,
  clip, noise_multiplier, the audit's fields (epsilon_audit, audit_confidence, ...) when given, not_covered (a
  list) and text.
  """
  from fedjax_tl.privacy import accounting
  from fedjax_tl.privacy.dp_ftrl import ParticipationSampler

  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")
  kind, agg, audited = _mechanism(algorithm, dp_fedavg)
  out: dict = {"unit": UNIT, "delta": delta, "rounds": rounds, "population": population}
  if kind in ("dp-fedavg", "adaptive"):
    if isinstance(sampler, ParticipationSampler):
      raise ValueError("DP-FedAvg's accounting assumes uniformly sampled fixed-size cohorts (sample_clients); a "
                       "ParticipationSampler draws by a participation schema instead, so the epsilon would be "
                       "false. Use DPFTRL with it, or run_rounds' default sampler with DP-FedAvg.")
    if kind == "adaptive":
      clip, z, m = agg.initial_clip, agg.noise_multiplier, agg.cohort_size
      mech = (f"DP-FedAvg with adaptive clipping (Andrew et al. 2021): initial clip {clip}, noise multiplier {z:.4f} "
              f"split between the clipped-count and the deltas, uniform mean over {m} clients")
    else:
      clip, z, m = dp_fedavg if agg is None else (agg.clip, agg.noise_multiplier, agg.cohort_size)
      mech = (f"DP-FedAvg (McMahan et al. 2018): every client's update clipped to L2 norm {clip}, Gaussian noise of "
              f"std {z:.4f} x clip on the sum (noise multiplier {z:.4f}), uniform mean over {m} clients")
    custom = sampler is not None
    out.update(mechanism=mech, clip=clip, noise_multiplier=z, cohort_size=m, accountant=accountant,
               neighbouring="replace-one: neighbouring populations differ by replacing one client's data (the "
                            "population size is public); one client moves the clipped sum by up to 2 x clip",
               sampling=(f"fixed-size cohorts: {m} of the {population} clients uniformly without replacement, "
                         "independently every round" + (" (a custom sampler was given: the claim holds only if it "
                                                        "samples so)" if custom else "")),
               epsilon=accounting.epsilon(z, population, m, rounds, delta, accountant, "fixed"))
  elif kind == "dp-ftrl":
    if sampler is None or not isinstance(sampler, ParticipationSampler):
      raise ValueError("DP-FTRL's guarantee rests on its participation schema: run it with "
                       "sampler=ParticipationSampler(...) (the aggregator drops clients that break the schema, so "
                       "with another sampler the run uses fewer clients than it sampled).")
    if (sampler.min_sep < agg.min_sep or (agg.max_participations is not None and (
        sampler.max_participations is None or sampler.max_participations > agg.max_participations))):
      raise ValueError(f"The sampler's schema ({sampler.describe()}) is looser than the one DP-FTRL is accounted "
                       f"for (min_sep {agg.min_sep}, max_participations {agg.max_participations}).")
    if sampler.num_clients != population or agg.population != population:
      raise ValueError(f"population {population}, the sampler's {sampler.num_clients} clients and DP-FTRL's "
                       f"population {agg.population} must agree.")
    out.update(mechanism=agg.describe(), clip=agg.clip, noise_multiplier=agg.noise_multiplier,
               sensitivity=agg.sensitivity, accountant="exact Gaussian (dp-accounting; sensitivity by jax-privacy)",
               neighbouring=("replace-one: one client's data replaced arbitrarily (its participation rounds, fixed "
                             "by the schema, unchanged); it moves each of its rounds' clipped sums by up to 2 x clip"
                             if agg.neighbouring == "replace-one" else
                             "zero-out: one client's data replaced by data whose updates are zero (its participation "
                             "rounds unchanged); it moves each of its rounds' clipped sums by up to clip"),
               sampling=f"participation schema, no sampling assumption: {sampler.describe()}",
               epsilon=agg.epsilon(delta, rounds))
  else:
    out.update(mechanism="none: no clipping with noise, so no differential privacy", neighbouring="-",
               sampling="-", epsilon=math.inf, accountant="-")
  if audit is not None:
    out.update({k: v for k, v in audit.items()})
  elif audited:
    out["epsilon_audit"] = None  # audited, but the result was not passed in
  out["not_covered"] = _not_covered(algorithm, kind, has_model_state, audited or audit is not None)
  out["text"] = _text(out)
  return out


def _not_covered(algorithm, kind: str, has_model_state: bool | None, audited: bool) -> list[str]:
  items = []
  if kind == "none":
    items.append("everything: the run has no differential privacy")
  mode = getattr(algorithm, "model_state", None)
  if mode == "average" and has_model_state is not False:
    items.append("BatchNorm statistics (model_state='average') are averaged in the clear, neither clipped nor "
                 "noised" + ("" if has_model_state else " (if the model has any)"))
  if mode == "local" and has_model_state is not False:
    items.append("each client's own BatchNorm statistics (model_state='local') stay on the client; the global model's "
                 "statistics are the latest cohort's mean, in the clear")
  if getattr(algorithm, "hooks", None) is not None:
    items.append(f"what {type(algorithm.hooks).__name__}'s hooks keep per client or broadcast besides the model")
  items += [
      "metrics computed on clients' data and written to the log and metrics files (train loss and accuracy, "
      "per-client metrics such as update norms and clip fractions) are released without noise",
      "the frozen / pretrained parameters and their training data (public by assumption)",
      "hyperparameter tuning and repeated runs on the same clients (epsilon is for this one run)",
      "the server is trusted to clip and add the noise (central DP); clients' updates are visible to it unless "
      "secure aggregation is on, and the simulation's Gaussian sampler is not hardened against floating-point "
      "attacks (Mironov 2012)",
  ]
  if audited:
    items.append("the audit's lower bound, if given, holds at its confidence for this run's aggregator only; it "
                 "cannot confirm the accountant's epsilon, only refute it")
  return items


def _text(s: dict) -> str:
  eps = s["epsilon"]
  lines = [f"privacy: ({'inf' if eps == math.inf else f'{eps:.3f}'}, {s['delta']:g})-DP for {s['unit']}",
           f"  mechanism: {s['mechanism']}",
           f"  neighbouring relation: {s['neighbouring']}",
           f"  sampling / participation: {s['sampling']}",
           f"  accountant: {s['accountant']}; {s['rounds']} rounds, population {s['population']}"]
  if s.get("epsilon_audit") is not None:
    lines.append(f"  audit: epsilon >= {s['epsilon_audit']:.3f} at {s['audit_confidence']:.0%} confidence from "
                 f"{s['audit_canaries']} canaries ({s['audit_held_in']} held in; the most this audit could show: "
                 f"{s['epsilon_audit_max']:.3f})")
  lines.append("  not covered: " + "; ".join(s["not_covered"]))
  return "\n".join(lines)
