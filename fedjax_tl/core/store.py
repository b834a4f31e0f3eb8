"""Per-client state of a whole population: any pytree per client, stacked on a leading client axis.

An algorithm that keeps something per client across rounds (FedBN's normalisation statistics, error-feedback
residuals, SCAFFOLD's control variates, a personalised head) keeps it as one stacked pytree ``[num_clients,
...]`` inside its state, so it is checkpointed with the rest automatically. The round gathers the cohort's
rows before local training and scatters the cohort's new values back after it, here and nowhere else:

    store  = population(one_client_state, num_clients)
    cohort = gather(store, rows, num_clients, "client states")    # [C, ...]; padding rows read client 0
    store  = scatter(store, client_ids, new_cohort_values)        # only the real clients' rows are written

A client outside the cohort keeps its state; a padding client (after the real ones) writes nothing.

The store lives on device by default. For populations whose rows outgrow device memory (10^6 clients with a
personal head) it can live on the host instead, as a :class:`HostStore` (``population(..., where="host")``: numpy
arrays in RAM, or ``where="disk:/path"``: ``np.memmap`` files in a directory). ``gather`` then copies only the
cohort's rows to the device and ``scatter`` writes only theirs back (in place), so a round's time and device
memory do not depend on the population size; rows never written read the initial row (nothing is written at
init, so creating a store of 10^6 rows costs no time and, on disk, no space until clients train).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.data.client_data import small_pages as _small_pages
from fedjax_tl.types import PyTree

__all__ = ["population", "gather", "scatter", "num_rows", "HostStore", "on_host", "STORE_KINDS"]

STORE_KINDS = '"device" (default), "host" (numpy arrays in RAM) or "disk:/path" (np.memmap files in a directory)'


def population(one: PyTree, num_clients: int, where: str = "device") -> PyTree:
  """``one`` repeated for every client: each leaf gets a leading axis of ``num_clients`` (a fresh copy).

  ``where``: "device" (a device pytree), "host" or "disk:/path" (a :class:`HostStore`, see :func:`on_host`)."""
  if num_clients < 1:
    raise ValueError(f"A per-client store needs num_clients >= 1, got {num_clients}.")
  if not isinstance(where, str):
    raise TypeError(f"client_store must be {STORE_KINDS}; got {type(where).__name__}.")
  if where == "device":
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (num_clients, *jnp.shape(a))).copy(), one)
  if where == "host":
    return HostStore(one, num_clients)
  if where.startswith("disk:"):
    return HostStore(one, num_clients, directory=where[len("disk:"):])
  raise ValueError(f"client_store must be {STORE_KINDS}; got {where!r}.")


def on_host(one: PyTree, num_clients: int, directory: str | None = None) -> HostStore:
  """A :class:`HostStore` of ``num_clients`` rows initialised to ``one``: in RAM, or in ``directory`` on disk."""
  return HostStore(one, num_clients, directory)


class HostStore(Mapping):
  """Per-client rows ``[num_clients, ...]`` in host memory (numpy) or in ``np.memmap`` files of a directory.

  A read-only mapping from the row's parts (e.g. "params", "uplink") to their full arrays, as the device store's
  dict is. Only :func:`gather` and :func:`scatter` touch it during rounds: ``gather`` copies the given rows to the
  device, ``scatter`` writes the cohort's new rows **in place** (a disk store's files change as rounds run), so
  a ServerState before a round and the one after it share the store. Rows never written hold the initial row
  (tracked by a per-client ``written`` flag, so that init writes nothing). Reading a whole part (``store[part]``,
  e.g. ``ServerState.full_params`` averaging every client's head) writes the initial row into the unwritten rows
  once, which costs O(population).

  It is a pytree without leaves (jit passes it through as static data, by identity), so a ServerState holding
  it goes through the jitted server update unchanged and never to the device as a whole. A checkpoint
  (:mod:`fedjax_tl.checkpoint`) saves its arrays and flags with the rest of the state (the whole population:
  O(population) time and disk per save) and a restore writes them back into the template's store (for a disk
  store: into the template's files, which may have moved past the checkpoint's round before a crash).

  Args:
    one: one client's initial row (a pytree of arrays).
    num_clients: the population size.
    directory: None for RAM; else a directory for the files (created if missing; its store files are replaced).
  """

  def __init__(self, one: PyTree, num_clients: int, directory: str | None = None):
    if num_clients < 1:
      raise ValueError(f"A per-client store needs num_clients >= 1, got {num_clients}.")
    leaves, self._treedef = jax.tree.flatten(one)
    self._one = [np.asarray(a) for a in leaves]
    self.num_clients = int(num_clients)
    self.directory = None
    if directory is not None:
      if not directory:
        raise ValueError('client_store="disk:PATH" needs a directory path after "disk:", e.g. "disk:/data/rows".')
      directory = os.path.abspath(os.path.expanduser(directory))
      if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"The client store's path {directory} exists and is not a directory.")
      try:
        os.makedirs(directory, exist_ok=True)
      except OSError as e:
        raise ValueError(f"Cannot create the client store's directory {directory}: {e.strerror}. Give a "
                         "writable directory (disk:PATH).") from e
      if not os.access(directory, os.W_OK):
        raise ValueError(f"The client store's directory {directory} is not writable. Give a writable directory.")
      self.directory = directory
    self._rows = [self._new((self.num_clients, *a.shape), a.dtype, f"rows.{i}.npy") for i, a in enumerate(self._one)]
    self.written = self._new((self.num_clients,), np.bool_, "written.npy")
    if self.directory is not None:
      with open(os.path.join(self.directory, "store.json"), "w") as f:
        json.dump({"num_clients": self.num_clients,
                   "rows": [[list(a.shape), str(a.dtype)] for a in self._rows]}, f)

  def _new(self, shape, dtype, name):
    if self.directory is None:
      return _zero_pages(shape, dtype)  # zero pages are not resident until written
    # A sparse file: no disk space is used until rows are written.
    out = np.lib.format.open_memmap(os.path.join(self.directory, name), mode="w+", dtype=dtype, shape=shape)
    _small_pages(getattr(out, "_mmap", None))
    return out

  def __repr__(self):
    where = "RAM" if self.directory is None else self.directory
    return f"HostStore({self.num_clients} clients, {self.bytes_per_client} bytes each, {where})"

  @property
  def bytes_per_client(self) -> int:
    return int(sum(a.nbytes for a in self._one))

  # ---- the mapping: every part's full arrays ----
  def _full(self) -> PyTree:
    if not self.written.all():
      todo = np.flatnonzero(~self.written)
      for start in range(0, len(todo), 65536):  # in chunks: no population-sized temporary
        rows = todo[start:start + 65536]
        for a, one in zip(self._rows, self._one):
          a[rows] = one
      self.written[:] = True
    return jax.tree.unflatten(self._treedef, self._rows)

  def __getitem__(self, part):
    return self._full()[part]

  def __iter__(self):
    return iter(jax.tree.unflatten(self._treedef, self._one))

  def __len__(self):
    return len(jax.tree.unflatten(self._treedef, self._one))

  # Mapping's __eq__ would compare contents; jit compares static data by identity.
  __eq__ = object.__eq__
  __hash__ = object.__hash__

  # ---- the round's rows ----
  def gather(self, rows) -> PyTree:
    rows = np.asarray(rows, np.int64)
    fresh = ~self.written[rows]
    # Only rows a client has written are read from the store: an unwritten row is the initial row, so a disk store
    # touches no page of it (at 10^6 clients of 5 KB rows each page fault of the sparse file costs milliseconds).
    old = np.flatnonzero(~fresh)
    out = []
    for a, one in zip(self._rows, self._one):
      got = np.empty((len(rows), *a.shape[1:]), a.dtype)
      got[fresh] = one
      if old.size:
        got[old] = a[rows[old]]
      out.append(jax.device_put(got))
    return jax.tree.unflatten(self._treedef, out)

  def scatter(self, client_ids, new: PyTree) -> HostStore:
    ids = np.asarray(client_ids, np.int64)
    n = ids.shape[0]
    leaves, treedef = jax.tree.flatten(new)
    if treedef != self._treedef:
      raise ValueError(f"The cohort's new rows have the structure {treedef}, the store's rows {self._treedef}.")
    for a, v in zip(self._rows, leaves):
      a[ids] = np.asarray(v[:n]).astype(a.dtype)
    self.written[ids] = True
    return self

  # ---- checkpoints ----
  def state_dict(self) -> dict:
    """What a checkpoint saves: the raw rows (by leaf index) and the written flags."""
    return {"rows": {str(i): a for i, a in enumerate(self._rows)}, "written": self.written}

  def load_state_dict(self, saved: Mapping) -> HostStore:
    """Writes a checkpoint's rows and flags into this store (in place) and returns it."""
    for i, a in enumerate(self._rows):
      a[...] = np.asarray(saved["rows"][str(i)])
    self.written[...] = np.asarray(saved["written"])
    self.flush()
    return self

  def flush(self) -> None:
    """Writes a disk store's pages to its files (a no-op in RAM)."""
    for a in [*self._rows, self.written]:
      if isinstance(a, np.memmap):
        a.flush()


jax.tree_util.register_pytree_node(HostStore, lambda s: ((), s), lambda s, _: s)


def num_rows(store: PyTree) -> int | None:
  """The number of clients the store holds (None for an empty store)."""
  if isinstance(store, HostStore):
    return store.num_clients
  leaves = jax.tree.leaves(store)
  return leaves[0].shape[0] if leaves else None


def gather(store: PyTree, rows: jax.Array, num_clients: int, what: str = "client states") -> PyTree:
  """The cohort's rows ``[C, ...]`` (``rows`` are client ids, padding clients mapped to a valid row). Checks that
  the store covers the data's population, naming ``what`` in the error. ``None`` passes through."""
  if store is None:
    return None
  held = num_rows(store)
  if held is not None and held != num_clients:
    raise ValueError(f"Server state holds {held} {what} but the data has {num_clients} clients.")
  if isinstance(store, HostStore):
    return store.gather(rows)
  return jax.tree.map(lambda a: a[rows], store)


def scatter(store: PyTree, client_ids: jax.Array, new: PyTree) -> PyTree:
  """``store`` with the rows of ``client_ids`` (the cohort's real clients, in cohort order) set to the first
  ``len(client_ids)`` rows of ``new``; padding rows of ``new`` are dropped."""
  if isinstance(store, HostStore):
    return store.scatter(client_ids, new)
  n = client_ids.shape[0]
  return jax.tree.map(lambda all_, v: all_.at[client_ids].set(v[:n].astype(all_.dtype)), store, new)


def _zero_pages(shape, dtype) -> np.ndarray:
  """A zero array in anonymous memory (resident only where written), advised as :func:`_small_pages`."""
  import mmap

  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if size < (1 << 26):  # small stores: plain numpy
    return np.zeros(shape, dtype)
  m = mmap.mmap(-1, size)
  _small_pages(m)
  return np.frombuffer(m, dtype=dtype).reshape(shape)

