"""Builds the API reference from the docstrings with pdoc (the ``docs`` extra).

    python docs/build.py                 # HTML into docs/api/ (not committed); open docs/api/index.html
    python docs/build.py --out /tmp/api

Every warning pdoc emits (a submodule that fails to import, an annotation it cannot resolve, ...) is printed,
and the build exits with status 1 if there were any, so CI keeps the reference clean
(``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import pkgutil
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "api")


def _import_modules(package) -> list[str]:
  """Imports every public module of ``package``; returns the pdoc module specifications that document them all.

  They are passed to pdoc explicitly: it would otherwise hide the submodules that the package's ``__all__`` (the
  flat API) does not list, such as ``fedjax_tl.core`` and ``fedjax_tl.experiments``. On the way, each
  NamedTuple's generated ``__new__`` gets its class's module: Python makes it in a module of its own
  (``namedtuple_ServerState``), where pdoc cannot resolve the string annotations
  (``from __future__ import annotations``) of the signature it shows, e.g. ``params: Params``. Only this build
  process is changed.
  """
  from pdoc.extract import walk_specs

  specs = [package.__name__]
  covered = set(walk_specs(specs))  # what pdoc documents from these specs
  for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # parents before children
    if any(part.startswith("_") for part in info.name.split(".")):
      continue
    module = importlib.import_module(info.name)
    if info.name not in covered:
      specs.append(info.name)
      covered = set(walk_specs(specs))
    for obj in vars(module).values():
      if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields") and obj.__module__ == info.name:
        obj.__new__.__module__ = obj.__module__
  return specs


def build(out_dir: str = DEFAULT_OUT) -> list[str]:
  """Writes the HTML reference of ``fedjax_tl`` under ``out_dir``; returns pdoc's warnings (empty when clean)."""
  import pdoc
  import pdoc.render

  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's fedjax_tl, not another installed one
  import fedjax_tl

  for name in fedjax_tl.__all__:  # load the lazy flat API, so pdoc documents the real objects, not placeholders
    getattr(fedjax_tl, name)
  modules = _import_modules(fedjax_tl)
  pdoc.render.configure(docformat="google", show_source=True, search=True)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*modules, output_directory=pathlib.Path(out_dir))
  return [f"{w.category.__name__}: {w.message}" for w in caught]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: docs/api)")
  args = p.parse_args(argv)
  t = time.perf_counter()
  problems = build(args.out)
  for w in problems:
    print(w, file=sys.stderr)
  print(f"API reference written to {os.path.join(args.out, 'index.html')} ({time.perf_counter() - t:.1f}s, "
        f"{len(problems)} warnings)")
  if problems:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
