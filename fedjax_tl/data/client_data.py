"""Federated datasets that keep every example on device once and hand out fixed-shape cohorts.

The examples of all clients live in two device arrays (``x`` as uint8 images, ``y`` as int32 labels). A client
is a list of indices into them. A round's cohort is a padded ``[cohort, pad_size]`` index matrix plus the true
client sizes; batches are gathered from ``x`` by index *inside* the jitted step, so memory grows with the batch,
not the population, and ``pad_size`` (the population's largest client) never changes between rounds, so the
round compiles once whatever the cohort's client sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.data.partition import Partition

__all__ = ["FederatedData", "HostFederatedData", "Cohort", "Dataset", "check_labels"]


def check_labels(y, num_classes: int, what: str = "labels") -> tuple[int, int]:
  """Checks that ``y`` holds integer class indices in [0, num_classes) and returns (min, max) (0, -1 if empty).

  The models are trained with softmax cross-entropy on integer labels, where a float label would be truncated
  (2.39 -> 2), -1 would select the last class and a label >= the number of logits gives NaN losses; each of
  these raises a ValueError naming the values and the fix instead.
  """
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{what} must be a 1-D array of class indices, got shape {y.shape}.")
  if not (np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_)):
    frac = y[y != np.round(y)] if np.issubdtype(y.dtype, np.floating) else y[:0]
    example = f" ({len(frac)} are not whole numbers, e.g. {frac[:3].tolist()})" if len(frac) else ""
    raise ValueError(f"{what} must be integer class indices for the cross-entropy loss, got dtype {y.dtype}"
                     f"{example}. If these are class ids, cast them explicitly: y.astype(np.int32); for regression "
                     "(or any other) targets build the data with num_classes=None and train with an objective that "
                     "takes them, e.g. LocalTraining(..., objective=ftl.objectives.regression()).")
  if not num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  if not len(y):
    return 0, -1
  lo, hi = int(y.min()), int(y.max())
  if lo < 0 or hi >= num_classes:
    bad = (y < 0) | (y >= num_classes)
    values = np.unique(y[bad])
    raise ValueError(f"{int(bad.sum())} {what} are outside [0, {num_classes}) (values {values[:8].tolist()}"
                     f"{' ...' if len(values) > 8 else ''}): -1 would be read as the last class and a label >= "
                     f"{num_classes} as a NaN loss. Map the labels to 0..{num_classes - 1} (e.g. "
                     "np.unique(y, return_inverse=True)[1]) or set num_classes to the number of classes.")
  return lo, hi


def small_pages(m) -> None:
  """Asks the kernel for 4 KB pages and random access on a mapping (``mmap.mmap``; None: nothing) that a round
  reads or writes a few scattered rows of: a row's first touch then faults in one page, not a 2 MB huge page zeroed
  whole, and reads no readahead (per-client stores and host data of 10^6 clients, docs/performance.md)."""
  import mmap

  if m is None:
    return
  for advice in ("MADV_NOHUGEPAGE", "MADV_RANDOM"):
    if hasattr(mmap, advice):
      try:
        m.madvise(getattr(mmap, advice))
      except OSError:  # advice the kernel or the file system does not take: harmless
        pass


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A plain dataset: ``x`` uint8 (or float) examples, ``y`` int labels (``num_classes`` of them), or with
  ``num_classes=None`` targets of any shape and dtype (regression, multi-label, sequences: the objective checks
  them, :mod:`fedjax_tl.objectives`)."""

  x: np.ndarray
  y: np.ndarray
  num_classes: int | None

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}.")
    if self.num_classes is not None:
      check_labels(self.y, self.num_classes, "Dataset labels")

  def __len__(self) -> int:
    return len(self.y)

  def subset(self, idx: np.ndarray) -> Dataset:
    return Dataset(self.x[idx], self.y[idx], self.num_classes)


class Cohort(NamedTuple):
  """A round's clients as fixed-shape arrays (a pytree, passed to jit as is).

  Attributes:
    client_ids: int32 [C] ids into the population (-1 for a padding client).
    indices: int32 [C, pad_size] example indices into ``FederatedData.x`` (entries past the size are 0).
    num_examples: int32 [C] true client sizes (0 for a padding client).
  """

  client_ids: jax.Array
  indices: jax.Array
  num_examples: jax.Array

  @property
  def size(self) -> int:
    return int(self.client_ids.shape[0])

  def mask(self) -> jax.Array:
    """bool [C, pad_size]: which padded slots hold real examples."""
    pad = self.indices.shape[1]
    return jnp.arange(pad)[None, :] < self.num_examples[:, None]


@dataclasses.dataclass
class FederatedData:
  """All clients' examples on device plus per-client index lists.

  Attributes:
    x: device array [N, ...] of examples (uint8 images stay uint8 until the model's preprocessing).
    y: device array [N] int32 labels, integer class indices in [0, num_classes) (checked on construction); with
      ``num_classes=None``, targets ``[N, ...]`` of any shape (float32 or int32), checked by the training
      objective (:mod:`fedjax_tl.objectives`) when a round first sees them.
    client_indices: one sorted index array per client (a partition of range(N), or any subset).
    num_classes: number of label classes (None: the targets are not class labels).
    label_range: (smallest, largest) label, set on construction (None without classes).
    pad_size: length every client is padded to; defaults to the largest client, so it is fixed per
      population and rounds never recompile.
  """

  x: jax.Array
  y: jax.Array
  client_indices: Sequence[np.ndarray]
  num_classes: int | None
  pad_size: int = 0

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}.")
    if not len(self.client_indices):
      raise ValueError("FederatedData needs at least one client.")
    n = len(self.y)
    self.label_range = (None if self.num_classes is None else
                        check_labels(self.y, self.num_classes, "FederatedData labels"))
    self._sizes = np.array([len(c) for c in self.client_indices], dtype=np.int32)
    for i, c in enumerate(self.client_indices):
      if len(c) and (np.min(c) < 0 or np.max(c) >= n):
        raise ValueError(f"client {i} has indices outside [0, {n}).")
    if not self._sizes.any():
      raise ValueError(f"Every one of the {self.num_clients} clients has 0 examples: rounds would train on nothing "
                       "and report a loss of 0.0. Check the partition (its index lists) and that the dataset is "
                       "not empty.")
    largest = int(self._sizes.max())
    if self.pad_size == 0:
      self.pad_size = max(largest, 1)
    elif self.pad_size < largest:
      raise ValueError(f"pad_size={self.pad_size} is smaller than the largest client ({largest} examples).")
    # Flat CSR layout on host: building a cohort's index matrix is one numpy gather.
    self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
    # All clients' indices back to back, plus one trailing 0 that every padded slot points at.
    self._flat = np.concatenate([*(np.asarray(c, np.int64) for c in self.client_indices), [0]])

  @classmethod
  def from_partition(cls, data: Dataset, partition: Partition, pad_size: int = 0,
                     device: jax.Device | None = None) -> FederatedData:
    """Puts ``data`` on device once and records ``partition``'s index lists.

    Labels must be integer class indices in [0, num_classes) (checked; they are stored as int32). Targets of a
    dataset without classes (``num_classes=None``) are stored as int32 if integer, else float32.
    """
    y = np.asarray(data.y)
    if data.num_classes is not None:
      check_labels(y, data.num_classes, "Dataset labels")
    x = jax.device_put(np.asarray(data.x), device)
    y = jax.device_put(y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_ else
                                np.float32), device)
    return cls(x, y, list(partition), data.num_classes, pad_size)

  def split_clients(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[FederatedData, FederatedData]:
    """Each client's own held-out examples: ``(train, test)``, two populations with the same client ids.

    Client ``c``'s ``n`` examples are shuffled with ``np.random.default_rng([seed, c])`` (so a client's split
    depends on the seed and its id only, not on the other clients) and ``round(test_fraction * n)`` of them,
    clipped to [1, n - 1] when ``n >= 2``, go to ``test``; the rest to ``train``. Every client with at least 2
    examples thus keeps at least one in each; a client with 1 example keeps it for training (0 test examples:
    :func:`~fedjax_tl.core.evaluate.evaluate_per_client` gives it weight 0 and leaves it out of the unweighted
    statistics). The two parts are disjoint, together are the client's examples, and are sorted. Both share
    this population's on-device ``x`` and ``y`` (nothing is copied); each is padded to its own largest client.
    """
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    train, test = [], []
    for c, idx in enumerate(self.client_indices):
      idx = np.asarray(idx)
      n = len(idx)
      k = min(max(int(round(test_fraction * n)), 1), n - 1) if n >= 2 else 0
      perm = np.random.default_rng([seed, c]).permutation(n)
      test.append(np.sort(idx[perm[:k]]))
      train.append(np.sort(idx[perm[k:]]))
    if not any(len(t) for t in test):
      raise ValueError("No client has 2 or more examples, so none can hold any out for testing.")
    return (FederatedData(self.x, self.y, train, self.num_classes),
            FederatedData(self.x, self.y, test, self.num_classes))

  @property
  def num_clients(self) -> int:
    return len(self._sizes)

  @property
  def client_sizes(self) -> np.ndarray:
    return self._sizes.copy()

  def cohort(self, client_ids: Sequence[int] | np.ndarray, pad_clients_to: int | None = None) -> Cohort:
    """Fixed-shape cohort arrays for ``client_ids``.

    Args:
      client_ids: population ids of the round's clients.
      pad_clients_to: if given, appends padding clients (id -1, no examples, weight 0) up to this many, so
        e.g. a cohort splits into equal chunks.
    """
    ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= self.num_clients):
      raise ValueError(f"client ids must be in [0, {self.num_clients}); got {ids.min()}..{ids.max()}.")
    c = len(ids) if pad_clients_to is None else pad_clients_to
    if c < len(ids):
      raise ValueError(f"pad_clients_to={pad_clients_to} is smaller than the cohort ({len(ids)}).")
    sizes = np.zeros(c, np.int32)
    sizes[: len(ids)] = self._sizes[ids]
    pos = np.arange(self.pad_size)[None, :]
    valid = pos < sizes[:, None]
    starts = np.zeros(c, np.int64)
    starts[: len(ids)] = self._offsets[ids]
    indices = self._flat[np.where(valid, starts[:, None] + pos, len(self._flat) - 1)].astype(np.int32)
    out_ids = np.full(c, -1, np.int32)
    out_ids[: len(ids)] = ids
    return Cohort(client_ids=jnp.asarray(out_ids), indices=jnp.asarray(indices),
                  num_examples=jnp.asarray(sizes))

  def round_arrays(self, cohort: Cohort) -> tuple[jax.Array, jax.Array, Cohort]:
    """What a round's training reads: ``(x, y, cohort)`` with the cohort's indices into ``x``. On device: the
    whole arrays and the cohort unchanged (:class:`HostFederatedData` moves only the cohort's examples)."""
    return self.x, self.y, cohort

  def gather(self, cohort: Cohort) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cohort's examples as padded arrays ``x [C, pad, ...]``, ``y [C, pad]``, ``mask [C, pad]``.

    Padded slots repeat example 0 and are False in ``mask``. The training loop does not use this (it gathers
    batch by batch); it is here for inspection, evaluation per client and reference implementations.
    """
    idx = cohort.indices
    return self.x[idx], self.y[idx], cohort.mask()


@dataclasses.dataclass
class HostFederatedData(FederatedData):
  """Federated data whose examples stay on the host (numpy arrays, or ``np.memmap`` files for data larger than
  RAM); each round moves only its cohort's examples to the device.

  :meth:`round_arrays` gathers the cohort's padded slots into a compact ``[C * pad_size, ...]`` array (padding
  slots repeat example 0, as on device), remaps the cohort's indices to ``arange(C * pad_size)`` and puts both
  on the device, so training reads exactly the values it reads from :class:`FederatedData` (bit-identical
  params) while device memory holds one cohort, whatever the dataset's size; the shape is fixed per cohort size,
  so rounds compile once. :meth:`prefetch` starts the next round's gather in a background thread.

  :func:`~fedjax_tl.core.evaluate.evaluate` takes ``data.x``/``data.y`` as numpy and moves one batch at a time;
  :func:`~fedjax_tl.core.evaluate.evaluate_per_client` needs the examples on device (:meth:`to_device`).
  """

  def __post_init__(self):
    if isinstance(self.x, jax.Array) or isinstance(self.y, jax.Array):
      raise TypeError("HostFederatedData holds numpy arrays (or np.memmap); got a device array. Use "
                      "FederatedData for on-device data, or HostFederatedData.from_partition(dataset, partition).")
    self.y = np.asarray(self.y)
    if not np.issubdtype(self.y.dtype, np.int32) and np.issubdtype(self.y.dtype, np.integer):
      self.y = self.y.astype(np.int32)
    if isinstance(self.x, np.memmap):  # a round reads scattered examples: no readahead, no huge pages
      small_pages(getattr(self.x, "_mmap", None))
    super().__post_init__()
    self._prefetched = {}

  @classmethod
  def from_partition(cls, data: Dataset, partition: Partition, pad_size: int = 0,
                     device: jax.Device | None = None) -> HostFederatedData:
    """Keeps ``data``'s arrays on the host as they are (a ``np.memmap`` stays on disk) and records ``partition``."""
    y = np.asarray(data.y)
    if data.num_classes is not None:
      check_labels(y, data.num_classes, "Dataset labels")
    y = y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_ else np.float32)
    out = cls(data.x, y, list(partition), data.num_classes, pad_size)
    out._device = device
    return out

  def to_device(self, device: jax.Device | None = None) -> FederatedData:
    """The same population with every example on device (a :class:`FederatedData`)."""
    return FederatedData(jax.device_put(np.asarray(self.x), device), jax.device_put(self.y, device),
                         list(self.client_indices), self.num_classes, self.pad_size)

  def split_clients(self, test_fraction: float = 0.2, seed: int = 0):
    train, test = FederatedData.split_clients(self, test_fraction, seed)
    return (HostFederatedData(self.x, self.y, train.client_indices, self.num_classes),
            HostFederatedData(self.x, self.y, test.client_indices, self.num_classes))

  def _host_gather(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
    flat = indices.reshape(-1)
    device = getattr(self, "_device", None)
    return jax.device_put(np.asarray(self.x[flat]), device), jax.device_put(self.y[flat], device)

  def prefetch(self, cohort: Cohort) -> None:
    """Starts gathering ``cohort``'s examples (and their transfer) in a background thread; the round that uses
    the same cohort (same indices) picks the result up in :meth:`round_arrays`."""
    import concurrent.futures

    if not hasattr(self, "_pool"):
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedjax_tl-prefetch")
    indices = np.asarray(cohort.indices)
    self._prefetched = {indices.tobytes(): self._pool.submit(self._host_gather, indices)}

  def round_arrays(self, cohort: Cohort) -> tuple[jax.Array, jax.Array, Cohort]:
    indices = np.asarray(cohort.indices)
    future = self._prefetched.pop(indices.tobytes(), None)
    x, y = future.result() if future is not None else self._host_gather(indices)
    compact = jnp.arange(indices.size, dtype=jnp.int32).reshape(indices.shape)
    return x, y, cohort._replace(indices=compact)

  def gather(self, cohort: Cohort) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, y, c = self.round_arrays(cohort)
    return x[c.indices], y[c.indices], cohort.mask()
