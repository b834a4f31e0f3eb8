"""Per-round metrics: JSONL and CSV in the work directory, TensorBoard event files, a progress bar.

Files (under WORKDIR):
  metrics.jsonl  one JSON object per round (round, train_loss, train_accuracy, test_*, bytes_up, bytes_down,
                 wall_s, examples_per_s, ...), appended as rounds finish;
  metrics.csv    the same rows as a table (rewritten each round, columns = union of keys);
  tb/            TensorBoard event files (tensorboardX), one scalar per numeric metric.
On resume from round R, rows after R (written by the interrupted run after its last checkpoint) are dropped,
so every round appears exactly once.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence

__all__ = ["MetricsWriter", "MetricsFileError", "read_jsonl", "read_metrics", "format_table"]

_FIRST_COLUMNS = ("round", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "bytes_up",
                  "bytes_down", "wall_s", "examples_per_s")


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A right-aligned text table (floats with 4 decimals) with a rule under the header."""
  cells = [[h for h in header]] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


class MetricsFileError(ValueError):
  """A metrics.jsonl line is not a JSON object with an integer "round"."""


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl, each checked to be a JSON object with an integer "round". A cut-off last line
  (a run killed while appending) is dropped; any other bad line is a :class:`MetricsFileError` naming it."""
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1 and line.startswith("{"):  # a record without its newline: the write was cut off
        continue
      row = None
    if not (isinstance(row, dict) and isinstance(row.get("round"), int)):
      raise MetricsFileError(
          f"{path} line {i + 1} is not a metrics row (a JSON object with an integer 'round'): {line[:80]!r}. "
          "Repair or delete that line (or the file, losing the earlier rounds' metrics) and resume again.")
    rows.append(row)
  return rows


def _in_notebook() -> bool:
  """Whether this runs in a Jupyter/Colab kernel (an IPython shell over ZMQ), not merely in a process that
  imported ipykernel or IPython (some libraries do)."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
  return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")  # Shell: Colab's


def progress_bar(total_rounds: int, initial: int = 0, quiet: bool | None = None, desc: str = "rounds"):
  """A tqdm bar over rounds (on stderr), or None when ``quiet`` (None: quiet unless stderr is a terminal or this
  is a notebook, where tqdm.auto draws a widget)."""
  if quiet is None:
    quiet = not (sys.stderr.isatty() or _in_notebook())
  if quiet:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total_rounds, initial=initial, desc=desc, unit="round", dynamic_ncols=True)


def update_bar(bar, record: dict) -> None:
  if bar is not None:
    shown = {k: f"{record[k]:.4f}" for k in ("train_loss", "test_accuracy") if k in record}
    bar.set_postfix(shown, refresh=False)
    bar.update(1)


class MetricsWriter:
  """Writes round records to JSONL, CSV and TensorBoard; shows a progress bar unless ``quiet``.

  Args:
    workdir: directory for the files (created).
    total_rounds: rounds the run will reach (for the progress bar).
    resume_round: the round the run resumes from (rows after it are dropped); 0 for a fresh run.
    quiet: no progress bar (CI, logs); None: a bar only when stderr is a terminal.
    tensorboard: write TensorBoard event files.
  """

  def __init__(self, workdir: str, total_rounds: int, resume_round: int = 0, quiet: bool | None = False,
               tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.rows: list[dict] = []
    if os.path.exists(self.jsonl_path):
      self.rows = [r for r in read_metrics(self.jsonl_path) if r["round"] <= resume_round]
    with open(self.jsonl_path, "w") as f:  # rewrite: drop rows past the resume point
      for r in self.rows:
        f.write(json.dumps(r) + "\n")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_round + 1 if resume_round else None)
    self._bar = progress_bar(total_rounds, resume_round, quiet)

  def write(self, record: dict) -> None:
    self.rows.append(record)
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._write_csv()
    if self._tb is not None:
      for k, v in record.items():
        if k != "round" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, record["round"])
      self._tb.flush()
    update_bar(self._bar, record)

  def _write_csv(self) -> None:
    # Scalars only: per-client lists and nested dicts (e.g. client_metrics) are in metrics.jsonl.
    rows = [{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in self.rows]
    keys: list[str] = [k for k in _FIRST_COLUMNS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    tmp = self.csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=keys)
      w.writeheader()
      w.writerows(rows)
    os.replace(tmp, self.csv_path)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
