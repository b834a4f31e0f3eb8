"""Simulated secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"): the server learns only the sum of the cohort's updates.

Per round, for a cohort of n clients (host side, :meth:`SecureAggregation.setup_round`):

1. Every client draws a secret key sk_i and publishes g^sk_i (Diffie-Hellman over the prime 2^127 - 1); every
   pair (i, j) agrees on the seed s_ij = g^(sk_i sk_j), which both can compute and nobody else can.
2. Every client Shamir-shares sk_i among the cohort with threshold t (any t shares recover it, fewer reveal
   nothing).
3. Client i (on device, :meth:`client_encode`) clips every coordinate of its weighted update to [-R, R],
   scales it to fixed point and rounds stochastically (unbiased) into the field Z_(2^32), then adds
   sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij). The masked vector is uniformly distributed on its own.
4. Clients drop out at random (``dropout``) after masking; the survivors' vectors are summed mod 2^32 (the
   aggregator declares ``reducer = ModularSum(32)``), so every pairwise mask between two survivors cancels. For
   each dropped client the server collects t shares of its secret key from survivors, reconstructs it,
   recomputes its seeds with the survivors and removes the masks those left behind (:meth:`unmask`). Fewer
   than t survivors: the round is aborted (no update), as in the protocol.

The sum of n clipped values must stay inside the signed range of the field, |sum| <= 2^31 - 1, or it wraps
around and decodes with the wrong sign. The fixed-point scale leaves headroom for every rounding on the way:
it is (2^31 - 1 - 2n) / (n R (1 + 2^-21)) taken *down* to a float32, which covers float32 rounding up of R and
of the product (each at most 2^-24 relative) and the stochastic rounding of every client up by one unit; on
top of that every client's integer is clamped to +-floor((2^31 - 1) / n), so no input can overflow. The
decoded sum is exact up to the rounding of each client's value (at most 1/scale per client and coordinate,
unbiased). The resolution is n R / 2^31 per client; a 64-bit field (needing ``jax_enable_x64``) would be the
answer for cohorts so large that this matters (R / 2^21 at n = 1000).

What this does not simulate (stated, not hidden): authenticated channels and signatures, the second
("self") mask that protects a client who is merely slow, and cryptographic strength (the group is a Mersenne
prime with generator 3 and the PRG is threefry); the total weight of the survivors is sent in the clear.
Secure aggregation sends dense field elements, so compression saves no uplink bits when combined with it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import keys
from fedjax_tl.aggregators.base import (
  SUM,
  WEIGHTINGS,
  Message,
  ModularSum,
  RoundInfo,
  client_weight,
  mean_of,
  reducer_of,
  takes_message,
)

__all__ = ["SecureAggregation", "SecAggShared", "shamir_share", "shamir_reconstruct", "fixed_point_scale", "FIELD_BITS"]

FIELD_BITS = 32
_PRIME = 2**127 - 1  # DH group modulus and Shamir field
_GENERATOR = 3


def shamir_share(secret: int, num_shares: int, threshold: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """``num_shares`` points (x, f(x)) of a random polynomial of degree threshold-1 with f(0) = secret."""
  if not 1 <= threshold <= num_shares:
    raise ValueError(f"Need 1 <= threshold <= number of shares, got {threshold} and {num_shares}.")
  coeffs = [secret % _PRIME] + [int.from_bytes(rng.bytes(16), "little") % _PRIME for _ in range(threshold - 1)]
  shares = []
  for x in range(1, num_shares + 1):
    y = 0
    for c in reversed(coeffs):
      y = (y * x + c) % _PRIME
    shares.append((x, y))
  return shares


def shamir_reconstruct(shares: list[tuple[int, int]], threshold: int) -> int:
  """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
  if len(shares) < threshold:
    raise ValueError(f"Need {threshold} shares to reconstruct the secret, got {len(shares)}.")
  pts = shares[:threshold]
  secret = 0
  for i, (xi, yi) in enumerate(pts):
    num, den = 1, 1
    for j, (xj, _) in enumerate(pts):
      if i != j:
        num = num * (-xj) % _PRIME
        den = den * (xi - xj) % _PRIME
    secret = (secret + yi * num * pow(den, -1, _PRIME)) % _PRIME
  return secret


def fixed_point_scale(n: int, clip_value: float) -> float:
  """The largest float32 scale for which n clients' values in [-R, R], scaled, rounded up and summed, stay within
  the signed 32-bit range even after float32 rounding (module docstring)."""
  n = max(n, 1)
  exact = (2**31 - 1 - 2 * n) / (n * clip_value * (1 + 2**-21))
  s = np.float32(exact)
  if float(s) > exact:
    s = np.nextafter(s, np.float32(0))
  return float(s)


def _seed_words(s: int) -> tuple[int, int]:
  s %= 2**64
  return s >> 32, s & 0xFFFFFFFF


class SecAggShared(NamedTuple):
  """Round-wide data handed to every client's encoder (each client uses only its own row)."""

  seeds: jax.Array  # uint32 [C, C, 2]: PRG seed of every pair of cohort positions
  signs: jax.Array  # int32 [C, C]: +1 (add), -1 (subtract) or 0 (no mask: self or a padding position)
  alive: jax.Array  # bool [C]: the client's masked vector reaches the server
  scale: jax.Array  # float32: fixed-point scale
  qmax: jax.Array  # int32: every client's integers are clamped to [-qmax, qmax] so that n of them cannot wrap
  max_weight: jax.Array  # float32: weights are divided by this, so every weighted value is within [-R, R]


class _Recovery(NamedTuple):
  seeds: jax.Array  # uint32 [P, 2]: reconstructed seeds of (survivor, dropped) pairs, padded
  signs: jax.Array  # int32 [P]: the sign the survivor used (0 for padding)
  num_pairs: jax.Array  # int32


def _mask_leaf(key: jax.Array, leaf_index: int, shape) -> jax.Array:
  return jax.random.bits(jax.random.fold_in(key, leaf_index), shape, jnp.uint32)


def _signed_mask(tree_like, seed, sign):
  """sign * PRG(seed) in Z_2^32, shaped like ``tree_like``."""
  leaves, treedef = jax.tree.flatten(tree_like)
  out = []
  for i, a in enumerate(leaves):
    m = _mask_leaf(seed, i, a.shape)
    out.append(jnp.where(sign > 0, m, jnp.where(sign < 0, jnp.uint32(0) - m, jnp.uint32(0))))
  return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
  """Secure aggregation of the cohort's weighted updates.

  Attributes:
    clip_value: R, the bound on every coordinate of a client's weighted update (weights divided by the
      largest possible weight); larger values are clipped, and the fraction clipped is reported per round.
    dropout: probability that a client drops out after masking (its update is lost; its masks are removed).
    threshold: Shamir threshold as a fraction of the cohort: t = max(2, ceil(threshold * n)) shares recover a
      dropped client's key; fewer survivors abort the round.
    weighting: "num_examples" (FedAvg's weighted mean) or "uniform" (every client of the cohort weighs 1).

  An aggregator (:mod:`fedjax_tl.aggregators`): ``setup`` runs the key agreement, ``encode`` masks a client's
  weighted update, ``aggregate`` recovers dropped clients' masks and unmasks the sum, ``decode`` divides by the
  survivors' weight. Only the sum is learnt. It encodes a :class:`~fedjax_tl.aggregators.Message`: the hooks'
  message (unweighted) and, with ``FedAvg(model_state="average")``, the BatchNorm statistics (weighted, in the mean
  part: FedAvg sends them inside the message because ``covers_model_state`` is False) are masked with the delta;
  every coordinate of them must lie within ``clip_value`` as well.

  ``inner``: another aggregator whose wire this one masks (e.g. ``AdaptiveClipping``: its clipped, uniformly
  weighted update and its clip bit, both in the message, so the server learns only their sums): the inner one
  encodes each client (its weight is used), this one masks the result and unmasks the sum, the inner one decodes it
  (noise, the clip norm's update). Its state is the inner one's.
  """

  clip_value: float = 1.0
  dropout: float = 0.0
  threshold: float = 0.5
  weighting: str = "num_examples"
  inner: Any = None

  def __post_init__(self):
    if not self.clip_value > 0:
      raise ValueError(f"clip_value must be > 0, got {self.clip_value}.")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
    if not 0 < self.threshold <= 1:
      raise ValueError(f"threshold must be in (0, 1], got {self.threshold}.")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}.")
    if self.inner is not None:
      if reducer_of(self.inner) != SUM or not takes_message(self.inner):
        raise ValueError(f"SecureAggregation(inner=...) masks a weighted-sum aggregator's wire message; "
                         f"{type(self.inner).__name__} is not one (reducer {reducer_of(self.inner)}).")
      if self.clip_value < 1:
        raise ValueError(f"SecureAggregation(inner=...) needs clip_value >= 1: the inner aggregator's uniform "
                         f"weights and 0/1 bits must pass the coordinate clip unchanged, got {self.clip_value}.")

  # ---- the aggregator protocol (fedjax_tl.aggregators.base) ----
  reducer = ModularSum(FIELD_BITS)  # masked field elements, summed in Z_(2^32)
  takes_message = True  # masks the hooks' message with the delta (every coordinate within [-clip_value, clip_value])
  covers_model_state = False  # statistics averaged beside it would bypass the masking: FedAvg puts them in the message

  def init(self, template):
    return None if self.inner is None else self.inner.init(template)

  def setup(self, state, num_clients: int, padded: int, max_examples: float, key):
    if self.inner is None:
      return self.setup_round(num_clients, padded, key, 1.0 if self.weighting == "uniform" else float(max_examples))
    inner_shared, inner_host = self.inner.setup(state, num_clients, padded, max_examples, key)
    shared, host = self.setup_round(num_clients, padded, key, 1.0)  # the inner aggregator weighs clients 1
    return (shared, inner_shared), (host, inner_host)

  def encode(self, delta, num_examples, state, shared, ctx):
    if self.inner is not None:
      shared, inner_shared = shared
      delta, w, metrics = self.inner.encode(delta, num_examples, state, inner_shared, ctx)
    else:
      w, metrics = client_weight(self.weighting, num_examples, ctx.client_id), {}
    masked, clipped = self.client_encode(delta, w, ctx.position, keys.secure_agg(ctx.key), shared)
    return masked, jnp.where(shared.alive[ctx.position], w, 0.0), {**metrics, "secagg_clipped": clipped}

  def aggregate(self, message_sum, weight_sum, shared: SecAggShared, host):
    if self.inner is not None:
      shared, host = shared[0], host[0]
    recovery, metrics = self.recover(host)
    info = RoundInfo(senders=metrics["secagg_survivors"], aborted=recovery is None, metrics=metrics)
    if recovery is None:  # too few survivors to unmask: the round is aborted
      return None, weight_sum, info
    return self.unmask(message_sum, recovery, shared.scale, shared.max_weight), weight_sum, info

  def decode(self, total, weight_sum, state, client_metrics, real, key):
    frac = (client_metrics["secagg_clipped"] * real).sum() / jnp.maximum(real.sum(), 1.0)
    if self.inner is not None:
      mean, state, metrics = self.inner.decode(total, weight_sum, state, client_metrics, real, key)
      return mean, state, {**metrics, "secagg_clipped_fraction": frac}
    return mean_of(total, weight_sum), state, {"secagg_clipped_fraction": frac}

  def bits(self, template) -> int:
    return FIELD_BITS * sum(int(a.size) for a in jax.tree.leaves(template))

  def num_threshold(self, n: int) -> int:
    return min(n, max(2, math.ceil(self.threshold * n)))

  def setup_round(self, n: int, padded: int, round_key: jax.Array, max_weight: float):
    """Key agreement, secret sharing and the dropout draw for a cohort of ``n`` real clients (positions
    0..n-1 of a cohort padded to ``padded``). Returns (SecAggShared for the clients, host info for the server).
    """
    raw = round_key if round_key.dtype == jnp.uint32 else jax.random.key_data(round_key)
    rng = np.random.default_rng(np.asarray(raw).astype(np.uint64).ravel().tolist())
    sk = [int.from_bytes(rng.bytes(16), "little") % (_PRIME - 2) + 1 for _ in range(n)]
    pk = [pow(_GENERATOR, s, _PRIME) for s in sk]
    t = self.num_threshold(n)
    shares = [shamir_share(s, n, t, rng) for s in sk]  # shares[i][j]: client j's share of sk_i
    seeds = np.zeros((padded, padded, 2), np.uint32)
    signs = np.zeros((padded, padded), np.int32)
    for i in range(n):
      for j in range(i + 1, n):
        w = _seed_words(pow(pk[j], sk[i], _PRIME))
        seeds[i, j] = seeds[j, i] = w
        signs[i, j], signs[j, i] = 1, -1
    alive = np.zeros(padded, bool)
    alive[:n] = rng.random(n) >= self.dropout
    shared = SecAggShared(jnp.asarray(seeds), jnp.asarray(signs), jnp.asarray(alive),
                          jnp.float32(fixed_point_scale(n, self.clip_value)), jnp.int32((2**31 - 1) // max(n, 1)),
                          jnp.float32(max_weight))
    host = {"n": n, "padded": padded, "pk": pk, "shares": shares, "alive": alive[:n], "threshold": t,
            "signs": signs}
    return shared, host

  def client_encode(self, delta, weight, position, key, shared: SecAggShared):
    """One client's masked field vector (uint32 leaves) and the fraction of its coordinates that were clipped.
    A client that drops out sends nothing (zeros)."""
    r = self.clip_value
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(key, max(len(leaves), 1))
    w = weight / shared.max_weight
    # A Message: its mean part weighted as the delta, its sum part (the hooks' message) unweighted.
    weighted = len(jax.tree.leaves(delta.mean)) if isinstance(delta, Message) else len(leaves)
    encoded, clipped, total = [], 0.0, 0
    for i, (a, k) in enumerate(zip(leaves, keys)):
      v = (w * a.astype(jnp.float32)) if i < weighted else a.astype(jnp.float32)
      clipped += jnp.sum(jnp.abs(v) > r)
      total += a.size
      x = jnp.clip(v, -r, r) * shared.scale
      low = jnp.floor(x)
      q = (low + (jax.random.uniform(k, x.shape) < x - low)).astype(jnp.int32)
      q = jnp.clip(q, -shared.qmax, shared.qmax)  # in int32: a float32 bound could itself round up
      encoded.append(jax.lax.bitcast_convert_type(q, jnp.uint32))
    masked = jax.tree.unflatten(treedef, encoded)

    def add_pair(q, acc):
      m = _signed_mask(acc, shared.seeds[position, q], shared.signs[position, q])
      return jax.tree.map(jnp.add, acc, m)

    masked = jax.lax.fori_loop(0, shared.signs.shape[0], add_pair, masked)
    alive = shared.alive[position]
    masked = jax.tree.map(lambda m: jnp.where(alive, m, jnp.uint32(0)), masked)
    return masked, clipped / max(total, 1)

  def recover(self, host) -> tuple[_Recovery | None, dict]:
    """The server's recovery step: reconstructs every dropped client's key from t survivors' shares and
    recomputes the seeds it shared with survivors. None when too few survived (the round is aborted)."""
    n, alive, t = host["n"], host["alive"], host["threshold"]
    survivors = [j for j in range(n) if alive[j]]
    dropped = [d for d in range(n) if not alive[d]]
    info = {"secagg_survivors": len(survivors), "secagg_dropped": len(dropped), "secagg_aborted": False}
    if len(survivors) < t:
      info["secagg_aborted"] = True
      return None, info
    padded = host["padded"]
    seeds = np.zeros((padded * padded, 2), np.uint32)
    signs = np.zeros(padded * padded, np.int32)
    p = 0
    for d in dropped:
      sk_d = shamir_reconstruct([host["shares"][d][j] for j in survivors], t)
      for j in survivors:
        seeds[p] = _seed_words(pow(host["pk"][j], sk_d, _PRIME))
        signs[p] = host["signs"][j, d]
        p += 1
    return _Recovery(jnp.asarray(seeds), jnp.asarray(signs), jnp.int32(p)), info

  @staticmethod
  @jax.jit
  def unmask(masked_sum, recovery: _Recovery, scale, max_weight):
    """Removes the survivors' masks shared with dropped clients and decodes the field sum to floats:
    sum over survivors of weight_i * clip(delta_i)."""

    def remove(p, acc):
      m = _signed_mask(acc, recovery.seeds[p], recovery.signs[p])
      return jax.tree.map(jnp.subtract, acc, m)

    total = jax.lax.fori_loop(0, recovery.num_pairs, remove, masked_sum)
    decode = lambda tree, w: jax.tree.map(  # noqa: E731
        lambda s: jax.lax.bitcast_convert_type(s, jnp.int32).astype(jnp.float32) / scale * w, tree)
    if isinstance(total, Message):  # the sum part was sent unweighted
      return Message(decode(total.mean, max_weight), decode(total.sum, 1.0))
    return decode(total, max_weight)
