"""Checkpoints of a federated run with orbax-checkpoint: save every N rounds, keep the last K, resume.

What is saved: the whole algorithm state, any pytree (for FedAvg: trainable and frozen params, model state,
server optimizer state, round number, every client's persistent state), keyed by its paths, and the run's
config as JSON. A per-client store on the host (``FedAvg.init(..., client_store="host" | "disk:/path")``) is
saved whole into the checkpoint (its rows and written flags, O(population) per save), not by reference to its
files: a disk store's files are written in place as rounds run, so after a crash they may be ahead of the last
checkpoint; a restore writes the checkpoint's rows back into the resumed run's store. Nothing lists the state's fields: a new algorithm's state is checkpointed as it is.
Several processes (:mod:`fedjax_tl.distributed`, a round split across them) checkpoint their replicated state
together: every process calls ``maybe_save`` and ``restore``, orbax synchronises them, process 0 writes and every
process reads; the work directory must be one every process sees (tests/test_distributed.py resumes 2 processes
bit-exactly). A disk store (``client_store="disk:PATH"``) needs a path of each process's own.
The randomness needs nothing more: every key derives from the config's seed and the round number
(:mod:`fedjax_tl.keys`), so a resumed run draws exactly what the uninterrupted run drew and
ends with bit-identical parameters on the same machine (tests/test_checkpoint.py kills a run with SIGKILL and
checks this).

A save is atomic: orbax writes into a temporary directory and renames it when complete, so a run killed during
a save leaves the previous checkpoint as the latest loadable one. A checkpoint damaged afterwards (truncated or
deleted files, unreadable metadata or config) is moved to ``WORKDIR/checkpoints.damaged/`` with a warning, and
the restore falls back to the newest intact one; a config or model that differs from the checkpoint's is a
:class:`ConfigMismatchError` instead (no fallback: an older checkpoint of the same run would not fit either).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_tl.core.store import HostStore
from fedjax_tl.types import PyTree

__all__ = ["Checkpointer", "CheckpointError", "ConfigMismatchError", "CheckpointCorruptError"]

# Fields that may differ between the run that saved and the run that resumes.
RESUMABLE_FIELDS = ("rounds", "workdir", "resume", "checkpoint_every", "keep_checkpoints", "quiet")


class CheckpointError(Exception):
  """A checkpoint cannot be resumed from; the message says why and what to do."""


class ConfigMismatchError(CheckpointError, ValueError):
  """The config (or model) of a resumed run does not match the one stored with the checkpoint."""


class CheckpointCorruptError(CheckpointError):
  """Every checkpoint in the directory is damaged (each one is named with the reason)."""


class _Damaged(Exception):
  """One checkpoint cannot be read (internal: restore() falls back to an older one)."""


def _short(e: Exception, limit: int = 200) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _path(keys) -> str:
  """'a/b/0' for a tree path, whatever the key types (orbax's metadata has dicts where the state has
  NamedTuples)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _path_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_host_store(x) -> bool:
  return isinstance(x, HostStore)


def _to_tree(state: PyTree) -> dict:
  """Any state pytree as nested dicts of numpy arrays keyed by its paths (fields, dict keys, indices), which is
  what orbax stores; containers without arrays (None, empty optimizer states) store nothing. A per-client
  :class:`~fedjax_tl.core.store.HostStore` (RAM or disk) is saved whole: its rows and written flags."""
  tree: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_host_store)[0]:
    node = tree
    names = [_path_name(e) for e in path] or ["value"]
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf.state_dict() if _is_host_store(leaf) else np.asarray(leaf)
  return tree


def _from_tree(tree: dict, template: PyTree) -> PyTree:
  """The template's pytree (containers, e.g. NamedTuples and optax states) around the restored leaves."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_host_store)
  leaves = []
  for path, like in paths:
    node = tree
    for name in [_path_name(e) for e in path] or ["value"]:
      if not isinstance(node, dict) or name not in node:
        raise ConfigMismatchError(f"The checkpoint has no array at {jax.tree_util.keystr(path)}.")
      node = node[name]
    # A host store is restored into the template's own store (its RAM arrays or its files), in place.
    leaves.append(like.load_state_dict(node) if _is_host_store(like) else jax.numpy.asarray(node))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# Where the arrays of an older layout of a state lie now, so that its checkpoints still restore: FedAvg's four
# per-client stores (ServerState fields client_states, client_params, algorithm_clients, transform_states)
# became the parts of one store, ServerState.clients (a part of it: "clients/<part>" was "<old field>"), at any
# depth of the state (Ditto's "personal/clients/params" was "personal/client_params").
LEGACY_CLIENT_ROWS = {"model_state": "client_states", "params": "client_params", "algorithm": "algorithm_clients",
                      "uplink": "transform_states"}


def _to_legacy(tree: dict) -> dict:
  """``tree`` (nested dicts, as :func:`_to_tree` gives) in the layout before the client rows were one store:
  every ``clients`` dict whose keys are row parts becomes the old fields beside it."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _to_legacy(v) for k, v in tree.items()}
  rows = out.get("clients")
  if isinstance(rows, dict) and rows and set(rows) <= set(LEGACY_CLIENT_ROWS) and not (
      set(LEGACY_CLIENT_ROWS.values()) & set(out)):
    del out["clients"]
    out.update({LEGACY_CLIENT_ROWS[part]: v for part, v in rows.items()})
  return out


def _from_legacy(saved: dict, like: dict) -> dict:
  """``saved`` (restored in the old layout) back in the layout of ``like`` (the template's tree), the inverse
  of :func:`_to_legacy`."""
  if not isinstance(like, dict) or not isinstance(saved, dict):
    return saved
  out = {}
  for k, v in like.items():
    if k == "clients" and k not in saved and isinstance(v, dict) and set(v) <= set(LEGACY_CLIENT_ROWS):
      out[k] = {part: _from_legacy(saved[LEGACY_CLIENT_ROWS[part]], v[part]) for part in v}
    else:
      out[k] = _from_legacy(saved[k], v)
  return out


def _shapes(tree) -> dict:
  return {_path(k): f"{tuple(v.shape)} {np.dtype(v.dtype)}" for k, v in jax.tree_util.tree_leaves_with_path(tree)}


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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

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

  def restore(self, template: PyTree, round_num: int | None = None, log=None) -> PyTree:
    """The saved state (the newest intact one unless ``round_num``), shaped like ``template`` (a freshly
    initialised state of the same run).

    A damaged checkpoint is moved to ``checkpoints.damaged/`` and reported through ``log`` (default:
    ``warnings.warn``), and the next older one is tried. Raises ConfigMismatchError if the stored config or
    model differs, CheckpointCorruptError if no checkpoint is intact, FileNotFoundError if there is none.
    """
    steps = sorted(self.all_rounds(), reverse=True) if round_num is None else [round_num]
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    warn = log or (lambda msg: warnings.warn(msg, stacklevel=3))
    damaged = []
    for step in steps:
      try:
        return self._restore_step(step, template)
      except _Damaged as e:
        damaged.append(f"round {step}: {e}")
        moved = self._move_aside(step)
        warn(f"warning: checkpoint of round {step} in {self.directory} is damaged ({e}); moved it to {moved}"
             + (" and trying the previous one." if step != steps[-1] else "."))
    raise CheckpointCorruptError(
        f"No intact checkpoint in {self.directory} (damaged ones were moved to {self.directory}.damaged): "
        + "; ".join(damaged) + ". Restart without --resume in a new --workdir (or delete the checkpoints).")

  def _restore_step(self, step: int, template: PyTree) -> PyTree:
    try:
      saved_config = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # JSONDecodeError, KeyError (item missing), OSError, ...
      raise _Damaged(f"its config cannot be read: {type(e).__name__}: {_short(e)}") from e
    if not isinstance(saved_config, dict):
      raise _Damaged(f"its config is a {type(saved_config).__name__}, not a JSON object")
    self.check_config(saved_config)
    tree = _to_tree(template)
    try:
      metadata = self._manager.item_metadata(step)["state"]
      saved = {_path(k): f"{tuple(m.shape)} {np.dtype(m.dtype)}"
               for k, m in jax.tree_util.tree_leaves_with_path(getattr(metadata, "tree", metadata))}
    except Exception as e:
      raise _Damaged(f"its array metadata cannot be read: {type(e).__name__}: {_short(e)}") from e
    wanted = _shapes(tree)
    legacy = None
    if saved != wanted and saved == _shapes(_to_legacy(tree)):  # written before the client rows were one store
      legacy = _to_legacy(tree)
    if saved != wanted and legacy is None:
      diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs model {wanted.get(k, 'missing')}"
               for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
      raise ConfigMismatchError(
          f"Checkpoint {step} in {self.directory} does not fit this model ({len(diffs)} arrays differ: "
          + "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
          + "). Resume with the code and settings that wrote it, or use a new --workdir.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree if legacy is None else legacy)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # the arrays' structure matched: what fails now is the data (truncated, deleted)
      raise _Damaged(f"its arrays cannot be read: {type(e).__name__}: {_short(e)}") from e
    restored = restored["state"]
    return _from_tree(restored if legacy is None else _from_legacy(restored, tree), template)

  def _move_aside(self, step: int) -> str:
    target = os.path.join(self.directory + ".damaged", str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target):
      target += f".{len(os.listdir(os.path.dirname(target)))}"
    os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()
