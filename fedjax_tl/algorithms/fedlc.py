"""FedLC, federated learning with logit calibration (Zhang et al. 2022, "Federated Learning with Label Distribution
Skew via Logits Calibration", ICML).

Under label skew a client's local cross-entropy pushes down the logits of the classes it rarely sees. FedLC trains
each client on calibrated logits ``z_c - tau * n_c^(-1/4)``, ``n_c`` the client's number of examples of class ``c``
(classes it does not hold count as 1e-8, i.e. a large margin), so the correction is the client's own; the server
averages as FedAvg. Built from the population's label counts: ``FedLC.for_data(data, tau)``; a client id beyond
them (a privacy audit's canaries) is not calibrated. ``tau = 0`` is FedAvg.
Classification with integer labels only.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

import fedjax_tl as ftl
from fedjax_tl.models.base import logits_of

__all__ = ["FedLC"]


@dataclasses.dataclass(frozen=True)
class FedLC(ftl.Hooks):
  """``FedAvg(local, hooks=FedLC.for_data(train_data, tau=1.0))``."""

  tau: float = 1.0
  label_counts: tuple[tuple[int, ...], ...] = ()  # per client of the population, per class

  def __post_init__(self):
    if not self.tau >= 0:
      raise ValueError(f"FedLC's tau must be >= 0, got {self.tau}.")
    if not self.label_counts:
      raise ValueError("FedLC needs every client's label counts: build it with FedLC.for_data(data, tau).")

  @classmethod
  def for_data(cls, data, tau: float = 1.0) -> FedLC:
    """FedLC with the label counts of ``data`` (a FederatedData with integer labels)."""
    if data.num_classes is None:
      raise ValueError("FedLC calibrates class logits: it needs data with integer labels (num_classes set).")
    y = np.asarray(data.y)
    counts = tuple(tuple(int(c) for c in np.bincount(y[np.asarray(idx, np.int64)], minlength=data.num_classes))
                   for idx in data.client_indices)
    return cls(tau, counts)

  def loss(self, loss, batch, params, state, ctx, t):
    if self.tau == 0:
      return loss, state
    table = jnp.asarray(self.label_counts, jnp.float32)
    # A client outside the table (e.g. a privacy audit's canary appended to the population) gets equal counts: a
    # constant shift of every logit, which leaves the cross-entropy as it is (no calibration).
    known = ctx.client_id < table.shape[0]
    counts = jnp.where(known, table[jnp.clip(ctx.client_id, 0, table.shape[0] - 1)], 1.0)
    logits = logits_of(batch.outputs).astype(jnp.float32)
    calibrated = logits - self.tau * jnp.maximum(counts, 1e-8) ** -0.25
    per = optax.softmax_cross_entropy_with_integer_labels(calibrated, batch.targets)
    m = batch.mask.astype(jnp.float32)
    return (per * m).sum() / jnp.maximum(m.sum(), 1.0), state
