"""The README and the reference pages in docs/: their runnable examples run as written, their links resolve, and
the front page stays short.

An example is a ```python block right after an HTML comment marker (``<!-- readme-example -->``); it is found
by its marker on whichever page it lives (README.md or docs/*.md), so moving it between pages keeps it tested.
"""

import math
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _example(marker):
  """The code after ``<!-- marker -->`` on the one page that has it, and that page's path (for tracebacks)."""
  found = [(page, m.group(1)) for page in PAGES
           for m in re.finditer(rf"<!-- {marker} -->\n```python\n(.*?)```", page.read_text(), re.S)]
  assert len(found) == 1, f"<!-- {marker} --> marks {len(found)} python blocks in README.md and docs/*.md, not one"
  page, code = found[0]
  return str(page.relative_to(ROOT)), code


def _run(marker):
  name, code = _example(marker)
  namespace = {}
  exec(compile(code, name, "exec"), namespace)  # noqa: S102
  return namespace


def test_readme_aggregator_example_runs(capsys):
  history = _run("readme-example")["history"]
  assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])
  weights = history[-1]["client_metrics"]["sqrt_weight"]
  sizes = history[-1]["client_metrics"]["num_examples"]
  assert [round(w * w, 3) for w in weights] == [float(n) for n in sizes] and len(sizes) == 3


def test_readme_algorithm_example_runs():
  namespace = _run("readme-algorithm-example")
  history, state = namespace["history"], namespace["state"]
  assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])
  assert float(state.algorithm_state) >= 1.0  # FedExP's step is never below FedAvg's
  plain = namespace["ftl"].FedAvg(namespace["algo"].local).communication_bytes(state)[1]
  assert history[-1]["bytes_up"] == 3 * (plain + 4)  # each client's |d_i|^2 is counted: 4 bytes


def test_readme_personalized_evaluation_example_runs():
  namespace = _run("readme-personal-example")
  own, tuned, test = namespace["own"], namespace["tuned"], namespace["test"]
  assert list(own["num_examples"]) == list(test.client_sizes) and own["accuracy"].shape == (4,)
  summary = tuned["summary"]["accuracy"]
  assert 0.0 <= summary["p10"] <= summary["mean"] <= 1.0 and 0.0 <= summary["weighted_mean"] <= 1.0


def _anchors(text):
  """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # '# ...' inside code blocks is not a heading
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_and_docs_links_resolve():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if re.match(r"[a-z]+:", target):  # http(s):, mailto: ... are not checked here
        continue
      path, _, anchor = target.partition("#")
      dest = (page.parent / path).resolve() if path else page
      if not dest.exists():
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_readme_front_page_is_short_and_links_every_reference_page():
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 150, "the front page is a summary: move reference material to docs/*.md"
  for page in PAGES[1:]:
    assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_objectives_example_runs():
  namespace = _run("objectives-example")
  history = namespace["history"]
  assert len(history) == 5 and history[-1]["train_loss"] < history[0]["train_loss"]
  assert "train_r2" in history[-1] and not all(r for h in history for r in h["client_metrics"]["reported"])
