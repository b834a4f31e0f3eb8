"""Builds the API reference from the docstrings with pdoc (the ``docs`` extra).

    python docs/build.py                 # HTML into docs/api/ (not committed); open docs/api/index.html
    python docs/build.py --out /tmp/api

The reference pages (README.md and docs/*.md) are rendered next to it, under ``guide/``, and every API page
lists them in its navigation (templates in docs/templates/).

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
import re
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "api")
DOCS = os.path.join(ROOT, "docs")
TEMPLATES = os.path.join(DOCS, "templates")
GUIDE = "guide"  # the reference pages' folder under the output directory


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


def _guides() -> list[dict[str, str]]:
  """The reference pages: README.md (as ``index.html``), then docs/*.md in the order the README links them.

  Each is ``{"source": path, "file": HTML file name under guide/, "title": its first heading}``.
  """
  readme = os.path.join(ROOT, "README.md")
  with open(readme) as f:
    linked = re.findall(r"\(docs/([\w-]+)\.md[)#]", f.read())
  names = sorted(n[:-3] for n in os.listdir(DOCS) if n.endswith(".md"))
  order = [n for n in dict.fromkeys(linked) if n in names] + [n for n in names if n not in linked]
  pages = [(readme, "index.html")] + [(os.path.join(DOCS, n + ".md"), n + ".html") for n in order]
  guides = []
  for source, file in pages:
    with open(source) as f:
      m = re.search(r"^# (.+)$", f.read(), re.M)
    title = "Overview (README)" if source == readme else m.group(1) if m else file
    guides.append({"source": source, "file": file, "title": title})
  return guides


def _link(target: str, page: str, html_of: dict[str, str], guide_dir: str) -> str:
  """A relative link of the markdown file ``page``, as seen from its HTML page in ``guide_dir``."""
  if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
    return target
  path, hash_, anchor = target.partition("#")
  dest = os.path.normpath(os.path.join(os.path.dirname(page), path))
  new = html_of.get(dest) or os.path.relpath(dest, guide_dir)  # another page, or the file in this checkout
  return new + hash_ + anchor


def _render_guides(out_dir: str, root_module: str, guides: list[dict[str, str]]) -> None:
  """Writes each reference page as HTML under ``out_dir/guide/``, its links between pages made links between the
  HTML pages."""
  from pdoc.render import env
  from pdoc.render_helpers import to_html

  guide_dir = os.path.join(out_dir, GUIDE)
  os.makedirs(guide_dir, exist_ok=True)
  html_of = {os.path.normpath(g["source"]): g["file"] for g in guides}
  template = env.get_template("guide.html.jinja2")
  for g in guides:
    with open(g["source"]) as f:
      text = f.read()
    source = g["source"]
    text = re.sub(r"\]\(([^)\s]+)\)", lambda m, s=source: "](" + _link(m.group(1), s, html_of, guide_dir) + ")", text)
    html = template.render(title=g["title"], body=to_html(text), guides=guides, root_module=root_module)
    with open(os.path.join(guide_dir, g["file"]), "w") as f:
      f.write(html)


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
  guides = _guides()
  pdoc.render.configure(docformat="google", show_source=True, search=True,
                        template_directory=pathlib.Path(TEMPLATES))
  pdoc.render.env.globals["guides"] = guides
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*modules, output_directory=pathlib.Path(out_dir))
    _render_guides(out_dir, fedjax_tl.__name__, guides)
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
