"""Moved: adaptive clipping is an aggregator, in :mod:`fedjax_tl.aggregators.dp`; this module keeps the old
import path working."""

from fedjax_tl.aggregators.dp import AdaptiveClipping

__all__ = ["AdaptiveClipping"]
