"""Federated next-character prediction on Python's own help topics (pydoc_data.topics, in the standard library).

Each client is one help topic ('formatstrings', 'specialnames', 'compound', ...: --num_clients of the largest),
so the clients' texts differ in subject, vocabulary and layout: non-IID by construction. A topic's text becomes
character ids (printable ASCII and newline; anything else is one unknown id), cut into windows of --window
characters with the next character as target (the last window padded, its padded targets -1 = left out of every
sum). Each client holds out --test_fraction of its windows. A small causal convolutional model (embedding, three
dilated causal convolutions, a per-position output layer) is trained with FedAvg and objectives.next_token(), and
reported with token accuracy and perplexity on all held-out windows and per client (evaluate_per_client), against
unigram and bigram models counted in numpy on the training windows.

    python -m fedjax_tl.experiments.text                       # ~1 minute on 2 CPU cores
    python -m fedjax_tl.experiments.text --rounds=100 --workdir=/tmp/text
    python -m fedjax_tl.experiments.text --num_clients=20 --clients_per_round=5
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import objectives
from fedjax_tl.core.client import LocalTraining, client_optimizer
from fedjax_tl.core.evaluate import evaluate, evaluate_per_client
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.data.client_data import Dataset, FederatedData
from fedjax_tl.experiments.common import ConfigError, cli_main, format_table, run_in_workdir, write_results
from fedjax_tl.experiments.common import validate as validate_config
from fedjax_tl.experiments.rules import check, rule
from fedjax_tl.experiments.tasks import TaskFlags, per_client_report
from fedjax_tl.experiments.workdir import WorkdirStatus, finished
from fedjax_tl.models.base import Model

PAD = -1  # the padding id of the targets (objectives.next_token(pad_id=PAD))


@dataclasses.dataclass(frozen=True)
class Config(TaskFlags):
  EXPERIMENT: ClassVar[str] = "text"  # what a work directory records (fedjax_tl.experiments.workdir)
  num_clients: int = 40  # the largest help topics, one client each
  clients_per_round: int = 10
  rounds: int = 40
  local_steps: int = 10  # every client takes this many steps a round (small topics cycle through their windows)
  batch_size: int = 16
  client_lr: float = 0.01
  client_optimizer: str = "adam"
  window: int = 64  # characters per example
  hidden: int = 64  # channels of the convolutions
  test_fraction: float = 0.2


PRESETS = {
    "default": Config(),
    "smoke": Config(num_clients=6, clients_per_round=3, rounds=6, window=32, hidden=32),
}

RUN_DIRS = ("fedavg",)


@rule("window", bad=[["--window=1"]], experiments=("text",))
def _window(cfg):
  check(cfg.window >= 2, f"--window must be at least 2 characters, got {cfg.window}.")


@rule("local_steps", bad=[["--local_steps=0"]], experiments=("text",))
def _local_steps(cfg):
  check(cfg.local_steps >= 1, f"--local_steps must be a positive integer, got {cfg.local_steps}.")


def validate(cfg: Config) -> WorkdirStatus:
  """Every flag checked before any data is loaded or trained on; raises ConfigError naming the flag."""
  return validate_config(cfg, "text", RUN_DIRS)


class CausalConvLM(nn.Module):
  """Character ids [B, T] -> next-character logits [B, T, V]: an embedding, ``layers`` causal convolutions
  (kernel ``kernel``, dilations 1, 2, 4, ...; each position sees only itself and earlier ones) with residual
  connections, and a per-position output layer. Receptive field: 1 + (kernel - 1) * (2^layers - 1) characters.

  Each convolution is written as one Dense over the ``kernel`` shifted copies of its input, so the model has no
  XLA convolution: on CPU the round runs as one program with the local steps in a ``lax.scan``
  (``schedule="auto"``), which a convolution inside a loop body would slow down by an order of magnitude."""

  vocab: int
  hidden: int = 64
  kernel: int = 4
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden)(nn.Embed(self.vocab, 32)(x))
    t = h.shape[1]
    for i in range(self.layers):
      d = 2**i
      padded = jnp.pad(h, ((0, 0), ((self.kernel - 1) * d, 0), (0, 0)))  # left padding only: causal
      taps = [padded[:, j * d:j * d + t] for j in range(self.kernel)]  # oldest first; the last is position t
      h = h + nn.relu(nn.Dense(self.hidden)(jnp.concatenate(taps, -1)))
    return nn.Dense(self.vocab)(h)


def _ids(a):
  """The stored character ids are the model's inputs (no scaling)."""
  return a


def make_model(cfg: Config, vocab: int) -> Model:
  return Model(CausalConvLM(vocab, cfg.hidden), (cfg.window,), preprocess=_ids, sample_dtype=jnp.int32)


def load_topics() -> dict[str, str]:
  """pydoc's help topics: topic name -> text (the standard library's pydoc_data; its size depends on the Python
  version)."""
  from pydoc_data.topics import topics

  return dict(topics)


def vocabulary(texts) -> list[str]:
  """The characters kept: printable ASCII and newline seen in ``texts``; id ``len(chars)`` is the unknown one."""
  seen = set().union(*(set(t) for t in texts))
  return sorted(c for c in seen if c == "\n" or (c.isascii() and c.isprintable()))


def windows(ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping windows of ``window`` inputs with the next character as target: x [N, T], y [N, T]; the
  last window's positions past the text's end have input 0 and target ``PAD``."""
  n = max(1, -(-(len(ids) - 1) // window))
  x = np.zeros((n, window), np.int32)
  y = np.full((n, window), PAD, np.int32)
  for w in range(n):
    s = w * window
    chunk = ids[s:s + window + 1]
    x[w, :len(chunk) - 1] = chunk[:-1]
    y[w, :len(chunk) - 1] = chunk[1:]
  return x, y


def split_windows(sizes: list[int], test_fraction: float, seed: int) -> tuple[list, list]:
  """Each client's held-out windows (client ``c`` shuffled with ``default_rng([seed, c])``, ``round(f * n)``
  clipped to [1, n - 1] held out); indices into the concatenated windows."""
  train, test, start = [], [], 0
  for c, n in enumerate(sizes):
    perm = start + np.random.default_rng([seed, c]).permutation(n)
    k = int(np.clip(round(test_fraction * n), 1, n - 1)) if n >= 2 else 0
    test.append(np.sort(perm[:k]))
    train.append(np.sort(perm[k:]))
    start += n
  return train, test


def ngram_baselines(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, vocab: int) -> dict:
  """Unigram and bigram (previous character) models counted on the training windows, add-0.1 smoothed:
  name -> function (x, y) -> {"accuracy", "perplexity", "loss"} over the real (non-padding) targets."""
  xt, yt = x[train_idx].ravel(), y[train_idx].ravel()
  real = yt != PAD
  uni = np.bincount(yt[real], minlength=vocab) + 0.1
  big = np.full((vocab, vocab), 0.1)
  np.add.at(big, (xt[real], yt[real]), 1.0)
  log_uni = np.log(uni / uni.sum())
  log_big = np.log(big / big.sum(1, keepdims=True))

  def score(logp_of):
    def fn(xe, ye):
      xe, ye = xe.ravel(), ye.ravel()
      keep = ye != PAD
      logp = logp_of(xe[keep])  # [n, V]
      loss = -float(logp[np.arange(keep.sum()), ye[keep]].mean())
      return {"accuracy": float((logp.argmax(1) == ye[keep]).mean()), "perplexity": float(np.exp(loss)),
              "loss": loss}
    return fn

  return {"unigram": score(lambda prev: np.broadcast_to(log_uni, (len(prev), vocab))),
          "bigram": score(lambda prev: log_big[prev])}


def _summary(values: list[float], n: list[int]) -> dict:
  v, w = np.asarray(values), np.asarray(n, np.float64)
  return {"weighted_mean": float(np.average(v, weights=w)), "mean": float(v.mean()), "p10": float(np.percentile(v, 10))}


def run(cfg: Config, log=print) -> dict:
  status = validate(cfg)
  if status.action == "done":
    return finished(cfg, status, log)
  if status.note:
    log(f"note: {status.note}")
  t_start = time.perf_counter()
  topics = load_topics()
  if cfg.num_clients > len(topics):
    raise ConfigError(f"--num_clients={cfg.num_clients}: this Python's pydoc_data holds {len(topics)} help topics, "
                      f"one client each; use at most {len(topics)}.")
  names = sorted(topics, key=lambda k: (-len(topics[k]), k))[:cfg.num_clients]
  chars = vocabulary(topics[k] for k in names)
  index = {c: i for i, c in enumerate(chars)}
  vocab = len(chars) + 1  # + the unknown character
  xs, ys = zip(*(windows(np.array([index.get(c, len(chars)) for c in topics[k]], np.int32), cfg.window)
                 for k in names), strict=True)
  sizes = [len(a) for a in xs]
  x, y = np.concatenate(xs), np.concatenate(ys)
  train_parts, test_parts = split_windows(sizes, cfg.test_fraction, cfg.seed)
  tr_all, te_all = np.concatenate(train_parts), np.concatenate(test_parts)
  ds = Dataset(x, y, None)
  train = FederatedData.from_partition(ds, train_parts)
  test = FederatedData.from_partition(ds, test_parts)
  n_chars = int((y != PAD).sum())
  log(f"text: {len(names)} help topics as clients ({n_chars} characters, vocabulary {vocab}), {len(tr_all)} train / "
      f"{len(te_all)} test windows of {cfg.window}; windows per client from {min(sizes)} ({names[-1]}) to "
      f"{max(sizes)} ({names[0]})")

  model = make_model(cfg, vocab)
  objective = objectives.next_token(pad_id=PAD)
  params0, state0 = model.init(jax.random.PRNGKey(cfg.seed))
  local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                        steps=cfg.local_steps, objective=objective)
  algo = FedAvg(local, server_optimizer=optax.sgd(cfg.server_lr), schedule=cfg.schedule)
  x_te, y_te = x[te_all], y[te_all]

  def eval_fn(s):
    return evaluate(model, s.full_params(), s.model_state, x_te, y_te, objective=objective)

  workdir = os.path.join(cfg.workdir, RUN_DIRS[0]) if cfg.workdir else None
  server, hist = run_in_workdir(cfg, algo, algo.init(params0, state0), train, rounds=cfg.rounds,
                                cohort_size=cfg.clients_per_round, evaluate_fn=eval_fn, workdir=workdir, log=log)
  t_fed = time.perf_counter() - t_start

  metrics = ("accuracy", "perplexity")
  final = eval_fn(server)
  results = {"fedavg": {m: float(final[m]) for m in (*metrics, "loss")}}
  per = {"fedavg": per_client_report(evaluate_per_client(model, server.full_params(), server.model_state, test,
                                                         objective=objective), metrics)}
  n_test = [int((y[i] != PAD).sum()) for i in test_parts]  # each client's test tokens (the summaries' weights)
  per["fedavg"]["num_tokens"] = n_test
  for name, fn in ngram_baselines(x, y, tr_all, vocab).items():
    results[name] = fn(x_te, y_te)
    rows = [fn(x[i], y[i]) for i in test_parts]
    per[name] = {"num_tokens": n_test, **{m: [r[m] for r in rows] for m in metrics},
                 **{f"{m}_summary": _summary([r[m] for r in rows], n_test) for m in metrics}}

  every = max(1, cfg.rounds // 10)
  rows = [[h["round"], h["train_loss"], h["test_accuracy"], h["test_perplexity"]] for h in hist
          if h["round"] % every == 0 or h["round"] == cfg.rounds]
  log(format_table(["round", "train_loss", "test_accuracy", "test_perplexity"], rows))
  header = ["model", "test accuracy", "test perplexity", "per-client accuracy (mean)", "per-client accuracy (p10)",
            "per-client perplexity (mean)"]
  log(format_table(header, [[n, r["accuracy"], r["perplexity"], per[n]["accuracy_summary"]["mean"],
                             per[n]["accuracy_summary"]["p10"], per[n]["perplexity_summary"]["mean"]]
                            for n, r in results.items()]))
  log(f"{cfg.rounds} rounds x {cfg.clients_per_round} clients x {cfg.local_steps} steps of {cfg.batch_size} windows; "
      f"{time.perf_counter() - t_start:.1f}s (FedAvg {t_fed:.1f}s)")
  summary = {"test": results, "per_client": per, "clients": names, "windows_per_client": sizes, "vocabulary": vocab,
             "characters": chars, "seconds": time.perf_counter() - t_start}
  write_results(cfg.workdir, cfg, hist, summary, log)
  return summary


def main(argv=None) -> None:
  """The command line: bad flags end with a usage error (exit 2) before anything is loaded."""
  cli_main(run, Config, PRESETS, argv, __doc__.splitlines()[0], validate)


if __name__ == "__main__":
  main(sys.argv[1:])
