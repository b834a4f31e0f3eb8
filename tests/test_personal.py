"""FedPer (Arivazhagan et al. 2019) with local_params: a personal head per client over a shared body, against a
plain reference built from one-client FedAvg rounds (public API only)."""

import jax
import numpy as np

import fedjax_tl


def _close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_fedper_keeps_every_clients_head(tiny_local, tiny_data, tiny_params):
  params, model_state = tiny_params
  key, ids, sizes = jax.random.PRNGKey(0), [1, 3], {1: 12.0, 3: 9.0}
  fedper = fedjax_tl.FedAvg(tiny_local, schedule="vmap", local_params="^head/")
  s0 = fedper.init(params, model_state, num_clients=tiny_data.num_clients)
  assert "head" not in s0.params and s0.client_params["head"]["kernel"].shape[0] == 5
  s1, m = fedper.apply(s0, tiny_data, np.array(ids), key)
  # Reference: client c alone, trained from the global body with its own head (a one-client FedAvg round is
  # that client's own training; its keys depend on the round key and its id only).
  plain = fedjax_tl.FedAvg(tiny_local, schedule="vmap")
  alone = {c: plain.apply(plain.init(s0.client_full_params(c), model_state), tiny_data, np.array([c]), key)[0]
           for c in ids}
  for c in ids:  # each head is the client's own, never averaged
    _close(jax.tree.map(lambda a, c=c: a[c], s1.client_params), {"head": alone[c].params["head"]})
  for c in (0, 2, 4):  # clients outside the cohort keep their heads
    _close(jax.tree.map(lambda a, c=c: a[c], s1.client_params), jax.tree.map(lambda a, c=c: a[c], s0.client_params))
  body = {k: v for k, v in alone[1].params.items() if k != "head"}
  want = jax.tree.map(lambda a, b: (sizes[1] * a + sizes[3] * b) / (sizes[1] + sizes[3]), body,
                      {k: v for k, v in alone[3].params.items() if k != "head"})
  _close(s1.params, want)  # the body is FedAvg's weighted mean
  d_body = sum(a.size for a in jax.tree.leaves(s1.params))
  assert int(m["bytes_up"]) == 2 * 4 * d_body  # the heads are never sent
