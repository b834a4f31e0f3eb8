"""Library misuse fails where it enters our code, with a message that names the problem, our part and the fix
(instead of a flax/JAX/Python error from deep inside a round), and a diverging loss warns (issue 27)."""

import dataclasses
import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_tl as ftl

KEY = jax.random.PRNGKey(0)


def _fed_data(shape, n=24, clients=3):
  rng = np.random.default_rng(1)
  ds = ftl.Dataset(rng.integers(0, 256, (n, *shape)).astype(np.uint8), rng.integers(0, 3, n).astype(np.int32), 3)
  return ftl.FederatedData.from_partition(ds, ftl.partition.iid(n, clients, seed=0))


# ---- params / model_state of another model ----


def test_init_with_params_of_another_model_names_the_paths_and_the_fix(tiny_local):
  wider = ftl.Model(ftl.CNN(num_classes=3, features=(6,), hidden=8), (8, 8, 1))
  with pytest.raises(ValueError, match=r"FedAvg\.init: the params are not those of the LocalTraining's model") as e:
    ftl.FedAvg(tiny_local).init(*wider.init(KEY))
  msg = str(e.value)
  assert "conv0/kernel has shape (3, 3, 1, 6), expected (3, 3, 1, 4)" in msg
  assert "model.init(key)" in msg and "ftl.pretrained.merge" in msg


def test_init_with_a_missing_layer_and_foreign_model_state(tiny_local, tiny_params):
  params, state = tiny_params
  with pytest.raises(ValueError, match=r"head/kernel \(8, 3\) is missing.*pretrained\.merge"):
    ftl.FedAvg(tiny_local).init({k: v for k, v in params.items() if k != "head"}, state)
  with pytest.raises(ValueError, match=r"FedAvg\.init: the model_state is not that of.*batch_stats/bn/mean \(4,\) is "
                                       r"unexpected.*model\.init"):
    ftl.FedAvg(tiny_local).init(params, {"batch_stats": {"bn": {"mean": jnp.zeros(4)}}})
  ftl.FedAvg(tiny_local).init(params, state)  # the model's own init passes


# ---- examples whose shape the model does not accept ----


def test_data_of_another_shape_than_sample_shape(tiny_local, tiny_params):
  data = _fed_data((10, 10, 1))
  algo = ftl.FedAvg(tiny_local)
  with pytest.raises(ValueError, match=r"run_rounds.*examples have shape \(10, 10, 1\).*sample_shape=\(8, 8, 1\)") as e:
    ftl.run_rounds(algo, algo.init(*tiny_params), data, rounds=1, cohort_size=2, seed=0)
  assert "Resize the data to (8, 8, 1)" in str(e.value) and "Model(..., sample_shape=(10, 10, 1))" in str(e.value)
  with pytest.raises(ValueError, match=r"^evaluate: the examples have shape \(10, 10, 1\).*Resize"):
    ftl.evaluate(tiny_local.model, *tiny_params, data.x, data.y)
  with pytest.raises(ValueError, match=r"evaluate_per_client \(test\).*\(10, 10, 1\)"):
    ftl.evaluate_per_client(tiny_local.model, *tiny_params, data)


def test_a_model_that_resizes_accepts_other_shapes(tiny_model, tiny_params):
  """The check accepts what the model accepts: here a preprocess that resizes any image to the module's 8x8."""
  resize = lambda x: jax.image.resize(x.astype(jnp.float32) / 255.0, (x.shape[0], 8, 8, 1), "linear")  # noqa: E731
  model = ftl.Model(tiny_model.module, [8, 8, 1], preprocess=resize)
  assert model.sample_shape == (8, 8, 1)  # a list is normalised: the model stays hashable
  data = _fed_data((12, 12, 1))
  out = ftl.evaluate(model, *tiny_params, data.x, data.y)
  assert out["num_examples"] == 24


# ---- optimizers that are not optax transformations ----


def test_optimizer_that_is_not_an_optax_transformation(tiny_model, tiny_local):
  with pytest.raises(TypeError, match=r"LocalTraining's optimizer must be an optax GradientTransformation \(an object "
                                      r"with init and update\), got float "
                                      r"0\.1\. A learning rate alone is not an optimizer\. Pass e\.g\. optax\.sgd"):
    ftl.LocalTraining(tiny_model, 0.1, batch_size=4)
  with pytest.raises(TypeError, match=r"LocalTraining's optimizer.*got str 'sgd'.*optax\.sgd\(0\.1\)"):
    ftl.LocalTraining(tiny_model, "sgd", batch_size=4)
  with pytest.raises(TypeError, match=r"got function .*sgd is a function that builds one: call it"):
    ftl.LocalTraining(tiny_model, optax.sgd, batch_size=4)
  with pytest.raises(TypeError, match=r"FedAvg's server_optimizer must be an optax.*got float 1\.0.*sgd\(1\.0\)"):
    ftl.FedAvg(tiny_local, server_optimizer=1.0)
  with pytest.raises(TypeError, match=r"Ditto's server_optimizer.*got int 1"):
    ftl.Ditto(tiny_local, lam=0.1, server_optimizer=1)
  with pytest.raises(TypeError, match=r"FederatedPruning\.server_optimizer's inner optimizer.*got float"):
    ftl.FederatedPruning(final_sparsity=0.5, end_round=2).server_optimizer(1.0)
  ftl.FedAvg(ftl.LocalTraining(tiny_model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), batch_size=4))


# ---- hooks with an unhashable field ----


@dataclasses.dataclass(frozen=True)
class ListHooks(ftl.Hooks):
  weights: list = dataclasses.field(default_factory=lambda: [1.0, 2.0])


@dataclasses.dataclass(frozen=True)
class ArrayHooks(ftl.Hooks):
  anchor: jax.Array = None


class EqHooks(ftl.Hooks):  # an __eq__ of its own without __hash__: Python makes the class unhashable
  def __eq__(self, other):
    return isinstance(other, EqHooks)


def test_hooks_with_an_unhashable_field(tiny_local):
  with pytest.raises(TypeError, match=r"FedAvg\(hooks=\.\.\.\): ListHooks\.weights is unhashable \(a list\).*"
                                      r"Make weights a tuple.*server_init / client_init"):
    ftl.FedAvg(tiny_local, hooks=ListHooks())
  with pytest.raises(TypeError, match=r"ArrayHooks\.anchor is unhashable \(a ArrayImpl\).*arrays.*belong in the "
                                      r"algorithm's state"):
    ftl.FedAvg(tiny_local, hooks=ArrayHooks(jnp.zeros(3)))
  with pytest.raises(TypeError, match=r"EqHooks is unhashable.*dataclasses\.dataclass\(frozen=True\)"):
    ftl.FedAvg(tiny_local, hooks=EqHooks())
  ftl.FedAvg(tiny_local, hooks=ListHooks((1.0, 2.0)))  # a tuple is fine


# ---- hook outputs that break the Hooks contract ----


@dataclasses.dataclass(frozen=True)
class SummedDelta(ftl.Hooks):
  def finish(self, delta, params, state, ctx, steps):
    return jax.tree.map(jnp.sum, delta), None, ctx.client_state


@dataclasses.dataclass(frozen=True)
class PartialDelta(ftl.Hooks):
  def finish(self, delta, params, state, ctx, steps):
    return {"head": delta["head"]}, None, ctx.client_state


@dataclasses.dataclass(frozen=True)
class TextMessage(ftl.Hooks):
  def finish(self, delta, params, state, ctx, steps):
    return delta, {"note": "hello"}, ctx.client_state


@dataclasses.dataclass(frozen=True)
class ShrinkingState(ftl.Hooks):
  def client_init(self, params):
    return {"c": jnp.zeros(4)}

  def finish(self, delta, params, state, ctx, steps):
    return delta, None, {"c": ctx.client_state["c"][:2]}


@dataclasses.dataclass(frozen=True)
class TwoValues(ftl.Hooks):
  def finish(self, delta, params, state, ctx, steps):
    return delta, None


def test_hook_finish_outputs_checked_against_the_contract(tiny_local, tiny_params):
  """A wrong delta from finish used to train on, silently broadcast into the params; now it is named at init."""
  with pytest.raises(ValueError, match=r"SummedDelta\.finish returned a delta that does not match the delta it was "
                                       r"given.*conv0/kernel has shape \(\), expected \(3, 3, 1, 4\).*jax\.tree\.map"):
    ftl.FedAvg(tiny_local, hooks=SummedDelta()).init(*tiny_params)
  with pytest.raises(ValueError, match=r"PartialDelta\.finish returned.*conv0/kernel \(3, 3, 1, 4\) is missing"):
    ftl.FedAvg(tiny_local, hooks=PartialDelta()).init(*tiny_params)
  with pytest.raises(TypeError, match=r"TextMessage\.finish's message: note is a str; every leaf must be a numeric"):
    ftl.FedAvg(tiny_local, hooks=TextMessage()).init(*tiny_params)
  with pytest.raises(ValueError, match=r"ShrinkingState\.finish returned a client_state that does not match the "
                                       r"client's persistent state.*c has shape \(2,\), expected \(4,\)"):
    ftl.FedAvg(tiny_local, hooks=ShrinkingState()).init(*tiny_params, num_clients=5)
  with pytest.raises(TypeError, match=r"TwoValues\.finish must return a tuple \(delta, message, client_state\) or "
                                      r"\(delta, message, client_state, metrics\), got tuple of length 2"):
    ftl.FedAvg(tiny_local, hooks=TwoValues()).init(*tiny_params)


@dataclasses.dataclass(frozen=True)
class ScalarGrads(ftl.Hooks):
  def grads(self, grads, params, state, ctx, t):
    return jax.tree.map(jnp.sum, grads), state


def test_hook_grads_checked_when_the_round_is_traced(tiny_local, tiny_params, tiny_data):
  algo = ftl.FedAvg(tiny_local, hooks=ScalarGrads())
  with pytest.raises(ValueError, match=r"ScalarGrads\.grads returned a grads that does not match the grads it was "
                                       r"given.*head/kernel has shape \(\), expected \(8, 3\)"):
    algo.apply(algo.init(*tiny_params), tiny_data, np.array([0, 1]), KEY)


@dataclasses.dataclass(frozen=True)
class DriftingMessage(ftl.Hooks):
  """Sends a message whose shape depends on Python state: one entry more every time finish is traced."""

  traces: ClassVar[list] = []

  def finish(self, delta, params, state, ctx, steps):
    self.traces.append(None)
    return delta, {"v": jnp.zeros(len(self.traces))}, ctx.client_state


@dataclasses.dataclass(frozen=True)
class ScalarServerStep(ftl.Hooks):
  def server_update(self, state, mean_delta, message_sum, cohort_size, num_clients, client_metrics):
    return jax.tree.map(jnp.sum, mean_delta), state


def test_hook_message_and_server_update_checked_in_the_round(tiny_local, tiny_params, tiny_data):
  # Between the cohort's clients (the one-program schedule traces finish for the accumulator, then in the scan).
  algo = ftl.FedAvg(tiny_local, hooks=DriftingMessage())
  with pytest.raises(ValueError, match=r"DriftingMessage\.finish sent messages whose structure or shapes differ "
                                       r"between the cohort's clients: v has shape \(\d+,\), expected \(\d+,\).*same "
                                       r"structure and shapes for every client and round"):
    algo.apply(algo.init(*tiny_params), tiny_data, np.array([0, 1]), KEY)
  # Between init (which counts the message's bytes) and the round (the host loop traces finish once here).
  algo = ftl.FedAvg(tiny_local, hooks=DriftingMessage(), schedule="sequential/host:1")
  with pytest.raises(ValueError, match=r"DriftingMessage\.finish sent a message in this round that differs from the "
                                       r"one FedAvg traced.*v has shape \(\d+,\), expected \(\d+,\)"):
    algo.apply(algo.init(*tiny_params), tiny_data, np.array([0]), KEY)
  algo = ftl.FedAvg(tiny_local, hooks=ScalarServerStep())
  with pytest.raises(ValueError, match=r"ScalarServerStep\.server_update returned a mean_delta that does not match the "
                                       r"trainable params.*conv0/bias has shape \(\), expected \(4,\)"):
    algo.apply(algo.init(*tiny_params), tiny_data, np.array([0, 1]), KEY)


# ---- divergence ----


def test_divergence_warning_fires_once_on_a_blowing_up_loss(tiny_model, tiny_data, tiny_params):
  """One step of SGD(300) per client: round 1's loss is the initial model's (~1.1), round 2's is ~1e4."""
  algo = ftl.FedAvg(ftl.LocalTraining(tiny_model, optax.sgd(300.0), batch_size=4, steps=1))
  state = algo.init(*tiny_params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, hist = ftl.run_rounds(algo, state, tiny_data, rounds=3, cohort_size=5, seed=0)
  div = [w for w in caught if issubclass(w.category, ftl.DivergenceWarning)]
  assert hist[1]["train_loss"] > 100 * hist[0]["train_loss"]
  assert len(div) == 1, [str(w.message) for w in caught]  # once per run
  msg = str(div[0].message)
  assert "in round 2" in msg and "x its first value" in msg and "Lower the client learning rate" in msg
  assert div[0].filename == __file__  # points at the caller's run_rounds line
  with warnings.catch_warnings():
    warnings.simplefilter("error", ftl.DivergenceWarning)
    ftl.run_rounds(algo, state, tiny_data, rounds=3, cohort_size=5, seed=0, divergence=None)  # turned off
  with pytest.raises(ValueError, match="divergence must be a factor > 1"):
    ftl.run_rounds(algo, state, tiny_data, rounds=1, cohort_size=5, seed=0, divergence=0.5)


def test_no_divergence_warning_on_a_normal_run(tiny_local, tiny_data, tiny_params):
  algo = ftl.FedAvg(tiny_local)
  with warnings.catch_warnings():
    warnings.simplefilter("error", ftl.DivergenceWarning)
    _, hist = ftl.run_rounds(algo, algo.init(*tiny_params), tiny_data, rounds=3, cohort_size=5, seed=0)
  assert all(np.isfinite(r["train_loss"]) for r in hist)


@pytest.mark.parametrize("ids,error,words", [
    ([1, 1], ValueError, "repeats clients [1]"), ([2, 2, 2], ValueError, "repeats clients [2]"),
    ([0.0, 1.0], TypeError, "client ids are integers"), ([], ValueError, "is empty"),
    ([0, 7], ValueError, "ids [7] outside [0, 5)"), ([-1, 0], ValueError, "ids [-1] outside"),
    ([[0, 1]], ValueError, "1-D array")])
def test_a_bad_cohort_from_the_sampler_is_named(tiny_local, tiny_data, tiny_params, ids, error, words):
  algo = ftl.FedAvg(tiny_local, schedule="sequential/host:1")
  with pytest.raises(error) as e:
    ftl.run_rounds(algo, algo.init(*tiny_params), tiny_data, rounds=1, seed=0, sampler=lambda key, r: ids)
  assert words in str(e.value) and "round 1" in str(e.value)
