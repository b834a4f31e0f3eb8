"""Checkpoints of a federated run with orbax-checkpoint: save every N rounds, keep the last K, resume.

What is saved: the whole algorithm state, any pytree (for FedAvg: trainable and frozen params, model state,
server optimizer state, round number, every client's persistent state), keyed by its paths, and the run's
config as JSON. Nothing lists the state's fields: a new algorithm's state is checkpointed as it is.
The randomness needs nothing more: every key derives from the config's seed and the round number
(:mod:`fedjax_tl.keys`), so a resumed run draws exactly what the uninterrupted run drew and
ends with bit-identical parameters on the same machine (tests/test_checkpoint.py kills a run with SIGKILL and
checks this).

A save is atomic: orbax writes into a temporary directory and renames it when complete, so a run killed during
a save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_tl.types import PyTree

__all__ = ["Checkpointer", "ConfigMismatchError"]

# Fields that may differ between the run that saved and the run that resumes.
RESUMABLE_FIELDS = ("rounds", "workdir", "resume", "checkpoint_every", "keep_checkpoints", "quiet")


class ConfigMismatchError(ValueError):
  """The config of a resumed run does not match the one stored with the checkpoint."""


def _path_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _to_tree(state: PyTree) -> dict:
  """Any state pytree as nested dicts of numpy arrays keyed by its paths (fields, dict keys, indices), which is
  what orbax stores; containers without arrays (None, empty optimizer states) store nothing."""
  tree: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    node = tree
    names = [_path_name(e) for e in path] or ["value"]
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.asarray(leaf)
  return tree


def _from_tree(tree: dict, template: PyTree) -> PyTree:
  """The template's pytree (containers, e.g. NamedTuples and optax states) around the restored leaves."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, _ in paths:
    node = tree
    for name in [_path_name(e) for e in path] or ["value"]:
      if not isinstance(node, dict) or name not in node:
        raise ConfigMismatchError(f"The checkpoint has no array at {jax.tree_util.keystr(path)}.")
      node = node[name]
    leaves.append(jax.numpy.asarray(node))
  return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
  """Saves and restores a run's server state under ``WORKDIR/checkpoints``.

  Args:
    workdir: the run's work directory.
    config: the run's config (a dataclass or dict), stored with each checkpoint and checked on resume.
    every: save every ``every`` rounds (the final round is always saved).
    keep: keep the last ``keep`` checkpoints.
  """

  def __init__(self, workdir: str, config: Any, every: int = 1, keep: int = 3):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every and keep must be >= 1, got {every}, {keep}.")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

  def latest_round(self) -> int | None:
    """The round of the last complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_rounds(self) -> list[int]:
    return list(self._manager.all_steps())

  def maybe_save(self, state: PyTree, final: bool = False, round_num: int | None = None) -> bool:
    """Saves ``state`` if its round (``round_num``, default ``state.round``) is a multiple of ``every`` (or
    ``final``); returns whether it saved."""
    r = int(state.round) if round_num is None else int(round_num)
    if not final and r % self.every:
      return False
    if r in self._manager.all_steps():
      return False
    self._manager.save(r, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_tree(state)),
                                                  config=ocp.args.JsonSave(self.config)), force=True)
    self._manager.wait_until_finished()
    return True

  def check_config(self, saved: dict, ignore: Iterable[str] = RESUMABLE_FIELDS) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {self.config.get(k)!r}"
             for k in sorted(set(saved) | set(self.config)) if k not in ignore and saved.get(k) != self.config.get(k)]
    if diffs:
      raise ConfigMismatchError(
          f"The config does not match the checkpoint in {self.directory}:\n  " + "\n  ".join(diffs)
          + "\nResume with the same settings, or use a new --workdir.")

  def restore(self, template: PyTree, round_num: int | None = None) -> PyTree:
    """The saved state (latest unless ``round_num``), shaped like ``template`` (a freshly initialised state
    of the same run). Raises ConfigMismatchError if the stored config differs, FileNotFoundError if none."""
    step = self.latest_round() if round_num is None else round_num
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    saved_config = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    self.check_config(saved_config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except ValueError as e:
      raise ConfigMismatchError(f"Checkpoint {step} in {self.directory} does not fit this model: {e}") from e
    return _from_tree(restored["state"], template)

  def close(self) -> None:
    self._manager.close()
