"""The README's "Write your own aggregator" example runs as written."""

import math
import pathlib
import re


def test_readme_aggregator_example_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  history = namespace["history"]
  assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])
  weights = history[-1]["client_metrics"]["sqrt_weight"]
  sizes = history[-1]["client_metrics"]["num_examples"]
  assert [round(w * w, 3) for w in weights] == [float(n) for n in sizes] and len(sizes) == 3


def test_readme_personalized_evaluation_example_runs():
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"<!-- readme-personal-example -->\n```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  own, tuned, test = namespace["own"], namespace["tuned"], namespace["test"]
  assert list(own["num_examples"]) == list(test.client_sizes) and own["accuracy"].shape == (4,)
  summary = tuned["summary"]["accuracy"]
  assert 0.0 <= summary["p10"] <= summary["mean"] <= 1.0 and 0.0 <= summary["weighted_mean"] <= 1.0
