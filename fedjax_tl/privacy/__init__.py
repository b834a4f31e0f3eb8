"""Privacy: accounting for DP-FedAvg (dp-accounting), DP-FTRL with matrix-factorization noise, the canary audit
and the run's privacy statement.

* :mod:`~fedjax_tl.privacy.accounting` - epsilon of DP-FedAvg and the noise multiplier for a target epsilon.
* :mod:`~fedjax_tl.privacy.dp_ftrl` - :class:`DPFTRL` (an aggregator: clip, sum, noise correlated across rounds by
  a jax-privacy strategy :class:`MFStrategy`), :class:`ParticipationSampler` and
  :func:`participation_violations`.
* :mod:`~fedjax_tl.privacy.audit` - :class:`CanaryAudit` (canary clients, one-run epsilon lower bound with
  jax-privacy's auditor), :func:`audit_mechanism` (an aggregator audited alone, on synthetic updates).
* :mod:`~fedjax_tl.privacy.statement` - :func:`privacy_statement` for results.json and the log.

DP-FTRL and the audit need jax-privacy (``pip install -e ".[privacy]"``), imported only when they run.
"""

from fedjax_tl.privacy.accounting import calibrate_noise_multiplier, dp_event, epsilon
from fedjax_tl.privacy.audit import CanaryAggregator, CanaryAudit, audit_mechanism, epsilon_lower_bound
from fedjax_tl.privacy.dp_ftrl import DPFTRL, MFStrategy, ParticipationSampler, participation_violations
from fedjax_tl.privacy.statement import privacy_statement

__all__ = ["epsilon", "calibrate_noise_multiplier", "dp_event", "DPFTRL", "MFStrategy", "ParticipationSampler",
           "participation_violations", "CanaryAudit", "CanaryAggregator", "audit_mechanism", "epsilon_lower_bound",
           "privacy_statement"]
