"""Per-client state of a whole population: any pytree per client, stacked on a leading client axis.

An algorithm that keeps something per client across rounds (FedBN's normalisation statistics, error-feedback
residuals, SCAFFOLD's control variates, a personalised head) keeps it as one stacked pytree ``[num_clients,
...]`` inside its state, so it is checkpointed with the rest automatically. The round gathers the cohort's
rows before local training and scatters the cohort's new values back after it, here and nowhere else:

    store  = population(one_client_state, num_clients)
    cohort = gather(store, rows, num_clients, "client states")    # [C, ...]; padding rows read client 0
    store  = scatter(store, client_ids, new_cohort_values)        # only the real clients' rows are written

A client outside the cohort keeps its state; a padding client (after the real ones) writes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_tl.types import PyTree

__all__ = ["population", "gather", "scatter", "num_rows"]


def population(one: PyTree, num_clients: int) -> PyTree:
  """``one`` repeated for every client: each leaf gets a leading axis of ``num_clients`` (a fresh copy)."""
  if num_clients < 1:
    raise ValueError(f"A per-client store needs num_clients >= 1, got {num_clients}.")
  return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (num_clients, *jnp.shape(a))).copy(), one)


def num_rows(store: PyTree) -> int | None:
  """The number of clients the store holds (None for an empty store)."""
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
  return jax.tree.map(lambda a: a[rows], store)


def scatter(store: PyTree, client_ids: jax.Array, new: PyTree) -> PyTree:
  """``store`` with the rows of ``client_ids`` (the cohort's real clients, in cohort order) set to the first
  ``len(client_ids)`` rows of ``new``; padding rows of ``new`` are dropped."""
  n = client_ids.shape[0]
  return jax.tree.map(lambda all_, v: all_.at[client_ids].set(v[:n].astype(all_.dtype)), store, new)
