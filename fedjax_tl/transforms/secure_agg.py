"""Moved: secure aggregation is an aggregator, in :mod:`fedjax_tl.aggregators.secure`; this module keeps the old
import path working."""

from fedjax_tl.aggregators.secure import (
  FIELD_BITS,
  SecAggShared,
  SecureAggregation,
  fixed_point_scale,
  shamir_reconstruct,
  shamir_share,
)

__all__ = ["SecureAggregation", "SecAggShared", "shamir_share", "shamir_reconstruct", "fixed_point_scale", "FIELD_BITS"]
