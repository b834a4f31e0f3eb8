"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh et al. 2020, "An Efficient Framework for Clustered
Federated Learning", NeurIPS), in its model-averaging form.

The server keeps ``k`` models and sends all of them; each client starts from the one with the lowest loss on its
first local batch (:meth:`fedjax_tl.Hooks.candidates`), trains it and sends its delta; each model becomes the
examples-weighted mean of the clients that chose it (a model no client chose this round is unchanged). Model 0 is
FedAvg's own params (``ServerState.params``, updated by the server optimizer: plain averaging with the default
``optax.sgd(1.0)``); models 1..k-1 live in ``ServerState.algorithm_state`` and are averaged plainly. With ``k = 1`` it
is FedAvg bit for bit. Models 1..k-1 start as model 0 plus Gaussian noise of scale ``init_scale`` (seeded), so the
clusters can separate; :func:`models` returns all ``k``.

Wire accounting: the downlink carries the k models; a client's uplink is its delta (counted as FedAvg's) plus the
index of its model (32 bits). The message is simulated as a dense one-hot stack of the delta, summed by the
aggregator; it assumes the examples-weighted ``Mean()`` aggregator. Each client reports its choice in its metrics
(``client_metrics["cluster"]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import fedjax_tl as ftl

__all__ = ["IFCA", "models"]


@dataclasses.dataclass(frozen=True)
class IFCA(ftl.Hooks):
  """``FedAvg(local, hooks=IFCA(num_models=k))``."""

  num_models: int = 2
  init_scale: float = 0.01
  seed: int = 0

  def __post_init__(self):
    if self.num_models < 1:
      raise ValueError(f"IFCA needs num_models >= 1, got {self.num_models}.")
    if not self.init_scale >= 0:
      raise ValueError(f"IFCA's init_scale must be >= 0, got {self.init_scale}.")

  def server_init(self, params):
    k = self.num_models - 1
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.PRNGKey(self.seed)
    others = [p[None] + self.init_scale * jax.random.normal(jax.random.fold_in(key, i), (k, *p.shape), p.dtype)
              for i, p in enumerate(leaves)]
    return jax.tree.unflatten(treedef, others)  # models 1..k-1, stacked [k - 1, ...]

  def broadcast(self, state, params):
    return state

  def candidates(self, ctx):
    return jax.tree.map(lambda g, o: jnp.concatenate([g[None], o]), ctx.global_params, ctx.server)

  def finish(self, delta, params, state, ctx, steps):
    j, n = ctx.choice, ctx.num_examples.astype(jnp.float32)
    onehot = (jnp.arange(self.num_models) == j).astype(jnp.float32)
    to_model0 = jax.tree.map(lambda d: jnp.where(j == 0, d, jnp.zeros_like(d)), delta)
    others = jax.tree.map(lambda d: onehot[1:].reshape(-1, *(1,) * d.ndim).astype(d.dtype) * (n * d)[None], delta)
    message = {"others": others, "counts": onehot * n}
    return to_model0, message, ctx.client_state, {"cluster": j.astype(jnp.float32)}

  def message_bits(self, message):
    return 32  # the index of the chosen model (its delta is counted as FedAvg's)

  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    counts = message_sum["counts"]
    # the aggregator's mean is over every client's weight; model 0's is over the clients that chose it
    scale = jnp.where(counts[0] > 0, counts.sum() / jnp.maximum(counts[0], 1e-12), 0.0)
    mean0 = jax.tree.map(lambda d: d * scale.astype(d.dtype), mean_delta)
    chose = counts[1:]
    step = lambda o, s: o + jnp.where(  # noqa: E731
        (chose > 0).reshape(-1, *(1,) * (o.ndim - 1)),
        s / jnp.maximum(chose, 1e-12).reshape(-1, *(1,) * (o.ndim - 1)).astype(o.dtype), 0)
    return mean0, jax.tree.map(step, state, message_sum["others"])


def models(state):
  """All k trainable models of an IFCA run's server state, stacked ``[k, ...]`` (model 0 first)."""
  return jax.tree.map(lambda g, o: jnp.concatenate([g[None], o]), state.params, state.algorithm_state)
