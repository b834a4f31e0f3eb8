"""Named PRNG streams, all derived from the experiment's one seed.

Every key of a run is a path of ``fold_in``\\ s from ``PRNGKey(seed)``, written here once:

    seed ─► sampling(seed, r)                     the cohort of round r
         └► round_key(seed, r)                    everything trained in round r
              ├► client(round_key, c)             client c's local training (c >= 0; padding clients: -1)
              │    ├► epoch(client, e)            the permutation of its examples in epoch e (e < 2^20)
              │    ├► step(client, t)             augmentation and dropout of local step t
              │    └► postprocess(client)         its update transforms (clip, compression, ...)
              │         └► secure_agg(post)       its secure-aggregation rounding
              └► server(round_key, stream)        server-side randomness, one named stream each: the server
                                                  transform (e.g. DP noise), the aggregator (DP-FedAvg noise,
                                                  adaptive clipping), downlink compression

Client keys fold the client id into the round key. Client ids are int32 (``< 2^31``, padding ``-1`` =
``2^32 - 1`` as uint32), so the server streams hang off ``fold_in(round_key, 2^32 - 2)``, a value no client
id can take. Before this module the server streams were ``fold_in(round_key, k << 20)`` for k = 3 (the
server transform, e.g. DP noise), 4 (adaptive clipping, now the aggregator stream) and 5 (downlink
compression): client ``3 << 20``
trained with exactly the DP-noise key. Those three streams changed; every other derivation is unchanged, so
runs without them are bit-identical to before.

Because every key depends on the seed and the round number only, a resumed run reproduces the same draws.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_tl.types import PRNGKey

__all__ = ["sampling", "round_key", "round_keys", "client", "epoch", "step", "postprocess", "secure_agg", "server",
           "SERVER_STREAMS"]

_SAMPLING, _TRAINING = 0, 1  # children of the seed's root key
_STEP, _POSTPROCESS = 1 << 20, 2 << 20  # children of a client key (epochs take the values below 2^20)
_SECURE_AGG = 7  # child of a client's postprocessing key
_SERVER = np.uint32(0xFFFF_FFFE)  # child of the round key that no client id (int32 >= 0, or -1) can be

# Server-side streams of a round: fold_in(server root, index).
SERVER_STREAMS = {"server_transform": 0, "aggregator": 1, "downlink": 2}


def _root(seed: int) -> PRNGKey:
  return jax.random.PRNGKey(seed)


@jax.jit
def _seed_child(root: PRNGKey, stream: int, round_idx) -> PRNGKey:
  return jax.random.fold_in(jax.random.fold_in(root, stream), round_idx)  # one program, not three op-by-op calls


def sampling(seed: int, round_idx: int) -> PRNGKey:
  """The key that draws round ``round_idx``'s cohort."""
  return _seed_child(_root(seed), _SAMPLING, round_idx)


def round_key(seed: int, round_idx: int) -> PRNGKey:
  """The key of everything trained in round ``round_idx`` (what ``algorithm.apply`` receives)."""
  return _seed_child(_root(seed), _TRAINING, round_idx)


def round_keys(seed: int, round_idx: int) -> tuple[PRNGKey, PRNGKey]:
  """(cohort sampling key, training key) of a round."""
  return sampling(seed, round_idx), round_key(seed, round_idx)


def client(key: PRNGKey, client_id) -> PRNGKey:
  """Client ``client_id``'s key in the round with key ``key`` (traceable; vmap over ids)."""
  return jax.random.fold_in(key, client_id)


def epoch(client_key: PRNGKey, e) -> PRNGKey:
  """The permutation key of local epoch ``e`` (``e < 2^20``)."""
  return jax.random.fold_in(client_key, e)


def step(client_key: PRNGKey, t) -> PRNGKey:
  """The key of local step ``t`` (split into augmentation and dropout keys)."""
  return jax.random.fold_in(jax.random.fold_in(client_key, _STEP), t)


def postprocess(client_key: PRNGKey) -> PRNGKey:
  """The key of the client's update transforms and aggregation encoding."""
  return jax.random.fold_in(client_key, _POSTPROCESS)


def secure_agg(postprocess_key: PRNGKey) -> PRNGKey:
  """The key of the client's secure-aggregation stochastic rounding."""
  return jax.random.fold_in(postprocess_key, _SECURE_AGG)


def server(key: PRNGKey, stream: str) -> PRNGKey:
  """The round's server-side stream ``stream`` (one of ``SERVER_STREAMS``), disjoint from every client key."""
  if stream not in SERVER_STREAMS:
    raise ValueError(f"Unknown server stream {stream!r}; known: {sorted(SERVER_STREAMS)}.")
  return jax.random.fold_in(jax.random.fold_in(key, _SERVER), SERVER_STREAMS[stream])
