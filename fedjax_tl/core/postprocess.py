"""The client side of FedAvg's aggregation, for one client (vmapped): the update transform, then the aggregator's
encoding of the whole message (delta, the hooks' message, shared statistics)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_tl.aggregators.base import Aggregator, Message
from fedjax_tl.core.client import ClientOutput
from fedjax_tl.core.execution import ClientContext
from fedjax_tl.transforms.base import UpdateTransform

__all__ = ["ClientEncode"]


@dataclasses.dataclass(frozen=True)
class ClientEncode:
  """The client side of FedAvg's aggregation, for one client (vmapped): the update transform, then the
  aggregator's encoding. A value of the client-side configuration only, so FedAvgs that differ elsewhere (e.g.
  in the server optimizer) share the runner's compiled programs (a bound method would not: it compares its
  ``__self__`` by identity)."""

  transform: UpdateTransform | None
  aggregator: Aggregator
  stats: bool = False  # the averaged model state (BatchNorm statistics) goes to the aggregator with the delta

  def __call__(self, out: ClientOutput, carry, ctx: ClientContext):
    if self.transform is not None:
      t = self.transform
      delta, new_carry = t.apply(out.delta, t.init(out.delta) if carry is None else carry, ctx.key)
      out = out._replace(delta=delta)
      if carry is not None:  # a client without examples sent nothing; its state must not move
        carry = jax.tree.map(lambda new, old: jnp.where(out.num_examples > 0, new, old), new_carry, carry)
    agg_state, agg_shared = (None, None) if ctx.shared is None else ctx.shared
    payload, hook_message, model_state = out.delta, out.message, out.model_state
    if self.stats and jax.tree.leaves(out.model_state):  # averaged with the delta inside the aggregator (masked)
      hooks_part = () if out.message is None else out.message
      payload, hook_message, model_state = Message((out.delta, out.model_state), hooks_part), None, None
    elif jax.tree.leaves(out.message):  # the hooks send a message: the aggregator encodes it with the delta
      payload, hook_message = Message(out.delta, out.message), None
    message, weight, extra = self.aggregator.encode(payload, out.num_examples, agg_state, agg_shared, ctx)
    return out._replace(delta=message, num_examples=weight, message=hook_message, model_state=model_state,
                        metrics={**out.metrics, **extra}), carry
