"""The worked tasks beyond images (docs/tasks.md), each run from its command line with tiny flags: federated
regression on scikit-learn's diabetes data and next-character prediction on Python's help topics. Each writes its
results file and beats its trivial baseline (the mean predictor; the unigram model)."""

import json

import numpy as np

from fedjax_tl.experiments import diabetes, text


def _results(tmp_path, module, argv):
  workdir = tmp_path / module.__name__.rsplit(".", 1)[-1]
  module.main(["--preset=smoke", f"--workdir={workdir}", "--quiet=true", *argv])
  with open(workdir / "results.json") as f:
    return json.load(f)


def test_diabetes_fedavg_beats_the_mean_predictor(tmp_path):
  out = _results(tmp_path, diabetes, [])
  assert out["config"]["rounds"] == 4 and len(out["history"]) == 4
  test = out["summary"]["test"]
  assert set(test) == {"fedavg", "centralized", "mean_predictor", "least_squares"}
  assert test["fedavg"]["mse"] < test["mean_predictor"]["mse"] and test["fedavg"]["r2"] > 0.1
  assert test["mean_predictor"]["r2"] < 0.01  # the training mean explains nothing of the test targets
  per = out["summary"]["per_client"]["fedavg"]
  assert len(per["r2"]) == len(per["mse"]) == 4 and all(n > 0 for n in per["num_examples"])
  # the clients are the sex x age-quantile groups, each holding out part of its patients
  clients = out["summary"]["clients"]
  assert [c["sex"] for c in clients] == [1, 2, 1, 2] and clients[0]["age"][1] <= clients[2]["age"][0]
  # per-client MSE weighted by test examples is the pooled test MSE
  np.testing.assert_allclose(per["mse_summary"]["weighted_mean"], test["fedavg"]["mse"], rtol=1e-4)


def test_text_fedavg_beats_the_unigram_model(tmp_path):
  out = _results(tmp_path, text, [])
  summary = out["summary"]
  test = summary["test"]
  assert test["fedavg"]["accuracy"] > test["unigram"]["accuracy"] + 0.05
  assert test["fedavg"]["perplexity"] < test["unigram"]["perplexity"]
  assert test["bigram"]["perplexity"] < test["unigram"]["perplexity"]
  per = summary["per_client"]["fedavg"]
  assert len(per["accuracy"]) == len(summary["clients"]) == 6
  np.testing.assert_allclose(per["accuracy_summary"]["weighted_mean"], test["fedavg"]["accuracy"], rtol=1e-4)
  np.testing.assert_allclose(np.exp(test["fedavg"]["loss"]), test["fedavg"]["perplexity"], rtol=1e-5)
  assert len(out["history"]) == 6 and "test_perplexity" in out["history"][-1]


def test_text_windows_pad_the_last_targets():
  x, y = text.windows(np.arange(10, dtype=np.int32), 4)
  assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 0, 0]]
  assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, -1, -1, -1]]
