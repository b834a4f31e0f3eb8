"""The optional jax-privacy dependency, imported only where it is used (``pip install -e ".[privacy]"``)."""

from __future__ import annotations

import importlib

INSTALL_HINT = 'pip install -e ".[privacy]"'


def jax_privacy(module: str):
  """``jax_privacy.<module>``, or an ImportError that says what needs it and how to install it."""
  try:
    return importlib.import_module(f"jax_privacy.{module}")
  except ImportError as e:
    if e.name is not None and not e.name.startswith("jax_privacy"):
      raise  # jax-privacy is installed but one of its own dependencies is not: show that
    raise ImportError(f"fedjax_tl's privacy audit and DP-FTRL use Google's jax-privacy (jax_privacy.{module}), which "
                      f"is not installed. Install it with: {INSTALL_HINT}  (or pip install jax-privacy==2.0.0)."
                      ) from e
