"""The API reference (docs/build.py) builds from the docstrings without a single pdoc warning, with the reference
pages (README.md, docs/*.md) rendered next to it."""

import importlib.util
import os

import pytest

pytest.importorskip("pdoc", reason="pdoc is not installed: pip install -e '.[docs]' (it is in the test extra too)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_module():
  spec = importlib.util.spec_from_file_location("docs_build", os.path.join(ROOT, "docs", "build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One build for this module's tests: (output directory, pdoc's warnings)."""
  out = tmp_path_factory.mktemp("api")
  return out, _build_module().build(str(out))


def test_api_reference_builds_without_warnings(built):
  tmp_path, problems = built
  assert problems == [], "pdoc warnings (fix the docstring or annotation they name):\n" + "\n".join(problems)
  index = (tmp_path / "index.html").read_text()
  assert "fedjax_tl" in index
  page = (tmp_path / "fedjax_tl.html").read_text()
  for name in ("FedAvg", "LocalTraining", "run_rounds"):  # the flat API is documented, not left as placeholders
    assert f'id="{name}"' in page, name
  assert "ForwardRef" not in (tmp_path / "fedjax_tl" / "core" / "fedavg.html").read_text()  # annotations resolved


def test_reference_pages_are_rendered_next_to_the_api(built):
  """README.md and docs/*.md become guide/*.html, linked from every API page and from each other."""
  tmp_path, problems = built
  assert problems == []
  pages = sorted(p.stem for p in (tmp_path / "guide").glob("*.html"))
  expected = sorted(["index"] + [n[:-3] for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")])
  assert pages == expected
  assert 'href="../../guide/transforms.html"' in (tmp_path / "fedjax_tl" / "core" / "fedavg.html").read_text()
  assert 'href="guide/algorithms.html"' in (tmp_path / "fedjax_tl.html").read_text()
  readme = (tmp_path / "guide" / "index.html").read_text()
  assert 'href="algorithms.html#write-your-own-aggregator"' in readme and 'id="the-library-in-one-screen"' in readme
  assert ".md\"" not in readme  # links between the pages point at the HTML pages
