"""The experiments' error for an unusable flag value or work directory (its own module: everything under
``fedjax_tl.experiments`` raises it, and it imports nothing)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
  """A flag value (or the work directory it names) is unusable; the message names the flag and the fix.

  The entry points turn it into ``PROG: error: MESSAGE`` and exit code 2, before any data is loaded.
  """
