"""Privacy accounting for DP-FedAvg on dp-accounting."""

from fedjax_tl.privacy.accounting import calibrate_noise_multiplier, dp_event, epsilon

__all__ = ["epsilon", "calibrate_noise_multiplier", "dp_event"]
