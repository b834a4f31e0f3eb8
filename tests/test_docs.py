"""The API reference (docs/build.py) builds from the docstrings without a single pdoc warning."""

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


def test_api_reference_builds_without_warnings(tmp_path):
  problems = _build_module().build(str(tmp_path))
  assert problems == [], "pdoc warnings (fix the docstring or annotation they name):\n" + "\n".join(problems)
  index = (tmp_path / "index.html").read_text()
  assert "fedjax_tl" in index
  page = (tmp_path / "fedjax_tl.html").read_text()
  for name in ("FedAvg", "LocalTraining", "run_rounds"):  # the flat API is documented, not left as placeholders
    assert f'id="{name}"' in page, name
  assert "ForwardRef" not in (tmp_path / "fedjax_tl" / "core" / "fedavg.html").read_text()  # annotations resolved
