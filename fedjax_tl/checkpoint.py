"""Checkpoints of a federated run with orbax-checkpoint: save every N rounds, keep the last K, resume.

What is saved: the whole :class:`~fedjax_tl.core.fedavg.ServerState` (trainable and frozen params, model
state, server optimizer state, round number, every client's persistent state) and the run's config as JSON.
The randomness needs nothing more: every key derives from the config's seed and the round number
(:func:`fedjax_tl.core.train.round_keys`), so a resumed run draws exactly what the uninterrupted run drew and
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

from fedjax_tl.core.fedavg import ServerState

__all__ = ["Checkpointer", "ConfigMismatchError"]

# Fields that may differ between the run that saved and the run that resumes.
RESUMABLE_FIELDS = ("rounds", "workdir", "resume", "checkpoint_every", "keep_checkpoints", "quiet")


class ConfigMismatchError(ValueError):
  """The config of a resumed run does not match the one stored with the checkpoint."""


def _to_tree(state: ServerState) -> dict:
  # Orbax stores nested dicts of arrays; None (no per-client state) becomes an empty dict.
  d = state._asdict()
  for name in ("client_states", "transform_states", "server_transform_state", "clip_norm"):
    d[name] = d[name] if d[name] is not None else {}
  return jax.tree.map(np.asarray, d)


def _from_tree(tree: dict, template: ServerState) -> ServerState:
  """Rebuilds a ServerState field by field, restoring the template's container types (e.g. optax
  NamedTuples) around the restored leaves."""
  fields = {}
  for name in ServerState._fields:
    like = getattr(template, name)
    if like is None:
      fields[name] = None
      continue
    leaves = jax.tree.leaves(tree[name])
    structure = jax.tree.structure(like)
    if len(leaves) != structure.num_leaves:
      raise ConfigMismatchError(
          f"Checkpoint field {name!r} has {len(leaves)} arrays, the model {structure.num_leaves}.")
    fields[name] = jax.tree.unflatten(structure, [jax.numpy.asarray(v) for v in leaves])
  return ServerState(**fields)


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

  def maybe_save(self, state: ServerState, final: bool = False) -> bool:
    """Saves ``state`` if its round is a multiple of ``every`` (or ``final``); returns whether it saved."""
    r = int(state.round)
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

  def restore(self, template: ServerState, round_num: int | None = None) -> ServerState:
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
