"""LoRA adapters (fedjax_tl.lora) against closed forms: the wrapped model equals the base model at init, its
kernels are W + scale * A @ B, and federated fine-tuning trains and sends only the adapters and the head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl


def test_lora_starts_as_the_base_model_and_adds_a_low_rank_update(tiny_model, tiny_data, tiny_params):
  base, state = tiny_params
  peft = ftl.lora(tiny_model, rank=2, alpha=4.0)
  params = peft.attach(base, jax.random.PRNGKey(1))
  x = tiny_data.x[:6]
  np.testing.assert_array_equal(peft.apply(params, state, x, train=False)[0], tiny_model.apply(base, state, x,
                                                                                                 train=False)[0])
  a = params["lora"]["conv0"]["kernel"]["a"]
  w = base["conv0"]["kernel"]  # [3, 3, 1, 4]: fan_in 9, c_out 4
  assert a.shape == (9, 2) and params["lora"]["conv0"]["kernel"]["b"].shape == (2, 4)
  b = jax.random.normal(jax.random.PRNGKey(2), (2, 4))
  params["lora"]["conv0"]["kernel"]["b"] = b
  expected = w + 2.0 * (np.asarray(a) @ np.asarray(b)).reshape(w.shape)  # scale alpha / rank = 2
  np.testing.assert_allclose(peft.merge(params)["conv0"]["kernel"], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(peft.apply(params, state, x, train=False)[0],
                             tiny_model.apply({**base, "conv0": {**base["conv0"], "kernel": expected}}, state, x,
                                              train=False)[0], rtol=1e-5, atol=1e-5)


def test_federated_lora_trains_and_sends_only_the_adapters_and_the_head(tiny_model, tiny_data, tiny_params):
  base, state = tiny_params
  peft = ftl.lora(tiny_model, rank=2)
  params = peft.attach(base, jax.random.PRNGKey(1))
  algo = ftl.FedAvg(ftl.LocalTraining(peft, optax.sgd(0.1), batch_size=4), trainable=ftl.LORA_AND_HEAD,
                    schedule="vmap")
  s0 = algo.init(params, state)
  s1, metrics = algo.apply(s0, tiny_data, np.array([0, 1, 3]), jax.random.PRNGKey(0))
  out = s1.full_params()
  for name in base:
    same = name != "head"
    for u, v in zip(jax.tree.leaves(out["base"][name]), jax.tree.leaves(base[name])):
      assert np.array_equal(u, v) == same, name  # the backbone is untouched, the head is trained
  assert not np.array_equal(out["lora"]["conv0"]["kernel"]["b"], 0)
  sent = 9 * 2 + 2 * 4 + sum(a.size for a in jax.tree.leaves(base["head"]))  # A, B and the head
  assert algo.communication_bytes(s0) == (4 * sent, 4 * sent)
  assert int(metrics["bytes_up"]) == 3 * 4 * sent


def test_lora_errors_name_the_problem(tiny_model, tiny_params):
  with pytest.raises(ValueError, match="matches no kernel"):
    ftl.lora(tiny_model, target="nothing_here").attach(tiny_params[0], jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="rank"):
    ftl.lora(tiny_model, rank=0)
  assert jnp.ndim(ftl.lora(tiny_model).init(jax.random.PRNGKey(0))[0]["lora"]["conv0"]["kernel"]["a"]) == 2
