"""Named algorithms against the papers' equations: FedAvgM/FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021,
Algorithm 2, written out in numpy) and FedProx (Li et al. 2020, a hand-written loop of proximal SGD steps)."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import fedjax_tl as ftl

ETA, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def _close(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, **kw)


def _reference(name, deltas):
  """Algorithm 2 of Reddi et al. in numpy: the server's update x_{t+1} - x_t for each mean delta Delta_t."""
  m, v, mom, out = 0.0, TAU**2, 0.0, []
  for d in deltas:
    if name == "fedavgm":  # optax.sgd(eta, momentum): trace = momentum * trace + g; x -= eta * trace
      mom = B1 * mom - d
      out.append(-ETA * mom)
      continue
    b1 = 0.0 if name == "fedadagrad" else B1
    m = b1 * m + (1 - b1) * d
    if name == "fedadagrad":
      v = v + d * d
    elif name == "fedadam":
      v = B2 * v + (1 - B2) * d * d
    else:
      v = v - (1 - B2) * d * d * np.sign(v - d * d)
    out.append(ETA * m / (np.sqrt(v) + TAU))
  return out


def _optimizer(name):
  if name == "fedavgm":
    return ftl.fed_avgm(ETA, momentum=B1)
  if name == "fedadagrad":
    return ftl.fed_adagrad(ETA, tau=TAU)
  return ftl.server_optimizer(name, ETA, beta1=B1, beta2=B2, tau=TAU)


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimizers_follow_the_paper(name):
  rng = np.random.default_rng(0)
  # Three steps; the third's delta is small, so Yogi's sign(v - Delta^2) flips from -1 to +1.
  deltas = [rng.normal(size=(5,)).astype(np.float32) * s for s in (1.0, 0.5, 0.01)]
  opt = _optimizer(name)
  params = {"w": np.zeros(5, np.float32)}
  state = opt.init(params)
  expected = _reference(name, [d.astype(np.float64) for d in deltas])
  for d, e in zip(deltas, expected, strict=True):
    updates, state = jax.jit(opt.update)({"w": -d}, state, params)  # the pseudo-gradient is -Delta
    np.testing.assert_allclose(updates["w"], e, rtol=1e-5, atol=1e-7)


def test_fedadam_bias_correction_is_optax_adam():
  g = {"w": np.arange(3.0, dtype=np.float32)}
  a, b = ftl.fed_adam(ETA, bias_correction=True), optax.adam(ETA, b1=0.9, b2=0.99, eps=1e-3)
  _close(a.update(g, a.init(g))[0], b.update(g, b.init(g))[0], rtol=0, atol=0)
  plain = ftl.fed_adam(ETA)
  assert not np.allclose(plain.update(g, plain.init(g))[0]["w"], a.update(g, a.init(g))[0]["w"])
  with pytest.raises(ValueError, match="Unknown server optimizer"):
    ftl.server_optimizer("fedsgd", 1.0)


def _loss_grad(model, state, x, y):
  def loss(p):
    logits, _ = model.apply(p, state, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.jit(jax.grad(loss))


def test_fedadam_round_matches_numpy_on_the_mean_delta(tiny_data, tiny_model, tiny_params):
  params, state = tiny_params
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(3)
  local = ftl.LocalTraining(tiny_model, optax.sgd(0.1), batch_size=12, steps=2)  # full batch for every client
  plain = ftl.FedAvg(local, schedule="vmap")
  s1, _ = plain.apply(plain.init(params, state), tiny_data, ids, key)
  mean_delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), s1.params, params)
  # FedAvg's own piece, against a plain loop over the clients: two full-batch SGD steps each, weighted mean.
  deltas, weights = [], []
  for c in ids:
    idx = tiny_data.client_indices[c]
    x, y = np.asarray(tiny_data.x)[idx], np.asarray(tiny_data.y)[idx]
    grad, w = _loss_grad(tiny_model, state, x, y), params
    for _ in range(2):
      w = jax.tree.map(lambda p, g: p - 0.1 * g, w, grad(w))
    deltas.append(jax.tree.map(lambda a, b: a - b, w, params))
    weights.append(len(idx))
  wts = np.array(weights, np.float64) / sum(weights)
  loop = jax.tree.map(lambda *ds: sum(wi * np.asarray(d, np.float64) for wi, d in zip(wts, ds)), *deltas)
  _close(mean_delta, loop, rtol=1e-4, atol=1e-6)
  # One FedAdam round = the paper's update on that mean delta (first step: m = (1-b1) D, v = b2 tau^2 + (1-b2) D^2).
  adam = ftl.fedopt("fedadam", local, ETA, {"beta1": B1, "beta2": B2, "tau": TAU}, schedule="vmap")
  s2, _ = adam.apply(adam.init(params, state), tiny_data, ids, key)
  expected = jax.tree.map(lambda p, d: np.asarray(p, np.float64) + _reference("fedadam", [d])[0], params, mean_delta)
  _close(s2.params, expected, rtol=1e-5, atol=1e-6)


def test_fedprox_mu_zero_is_fedavg_bit_for_bit(tiny_data, tiny_local, tiny_params):
  params, state = tiny_params
  ids, key = np.array([0, 1, 3]), jax.random.PRNGKey(4)
  results = []
  for local in (tiny_local, ftl.fedprox(tiny_local, 0.0)):
    algo = ftl.FedAvg(local, schedule="vmap")
    s, _ = algo.apply(algo.init(params, state), tiny_data, ids, key)
    results.append(s.params)
  _close(results[0], results[1], rtol=0, atol=0)


def test_fedprox_matches_proximal_sgd_loop(tiny_data, tiny_model, tiny_params):
  params, state = tiny_params
  mu, lr, steps, c = 0.5, 0.1, 3, 1
  local = ftl.fedprox(ftl.LocalTraining(tiny_model, optax.sgd(lr), batch_size=12, steps=steps), mu)
  algo = ftl.FedAvg(local, schedule="sequential")
  s, _ = algo.apply(algo.init(params, state), tiny_data, np.array([c]), jax.random.PRNGKey(0))
  idx = tiny_data.client_indices[c]  # 12 examples: one full batch
  grad = _loss_grad(tiny_model, state, np.asarray(tiny_data.x)[idx], np.asarray(tiny_data.y)[idx])
  w, plain = params, params
  for _ in range(steps):
    w = jax.tree.map(lambda p, g, a: p - lr * (g + mu * (p - a)), w, grad(w), params)
    plain = jax.tree.map(lambda p, g: p - lr * g, plain, grad(plain))
  _close(s.params, w, rtol=1e-5, atol=1e-5)
  assert not np.allclose(jax.tree.leaves(w)[0], jax.tree.leaves(plain)[0])  # the proximal term mattered
  with pytest.raises(ValueError, match="mu"):
    ftl.fedprox(local, -1.0)


def test_equal_configurations_are_equal(tiny_local):
  """Equal hyper-parameters give equal FedAvgs, which share their compiled programs."""
  make = lambda: ftl.FedAvg(ftl.fedprox(tiny_local, 0.1), server_optimizer=ftl.fed_yogi(0.01, tau=1e-3))
  assert make() == make() and hash(make()) == hash(make())
  assert ftl.fedopt("fedadam", tiny_local, 0.01) == ftl.fedopt("fedadam", tiny_local, 0.01)
  assert ftl.fedopt("fedadam", tiny_local, 0.01) != ftl.fedopt("fedadam", tiny_local, 0.02)


def test_digits_algorithm_flags(tiny_local):
  from fedjax_tl.experiments import digits
  from fedjax_tl.experiments.common import ConfigError

  cfg, _ = digits.parse_config(digits.Config, digits.PRESETS, ["--preset=smoke", "--algorithm=fedprox",
                                                                 "--prox_mu=0.5", "--server_lr=0.5"])
  digits.validate(cfg)
  kw = digits.algorithm_kwargs(cfg, tiny_local)
  assert isinstance(kw["local"].optimizer.init({"w": np.zeros(2)})[0], ftl.algorithms.ProxState)
  adam = dataclasses.replace(cfg, algorithm="fedadam", prox_mu=digits.Config.prox_mu)
  digits.validate(adam)
  kw = digits.algorithm_kwargs(adam, tiny_local)
  assert kw["local"] is tiny_local and isinstance(kw["server_optimizer"].init({"w": np.zeros(2)}),
                                                   ftl.algorithms.AdaptiveState)
  for bad, flag in ((dict(algorithm="fedsgd"), "--algorithm"), (dict(prox_mu=-1.0), "--prox_mu"),
                    (dict(algorithm="fedyogi"), "--prox_mu")):
    with pytest.raises(ConfigError, match=flag):
      digits.validate(dataclasses.replace(cfg, **bad))
  summary = digits.run(dataclasses.replace(adam, rounds=1, pretrain_epochs=1), log=lambda *_: None)
  assert all(0.0 <= a <= 1.0 for a in summary["final_test_accuracy"].values())


def test_experiment_algorithm_flags_build_each_algorithm_and_refuse_bad_combinations(tiny_local, tiny_data):
  from fedjax_tl.experiments import algorithms as flags
  from fedjax_tl.experiments import digits
  from fedjax_tl.experiments.common import ConfigError

  cfg = digits.PRESETS["smoke"]
  built = {a: flags.algorithm_kwargs(dataclasses.replace(cfg, algorithm=a), tiny_local, tiny_data)
           for a in flags.ALGORITHMS}
  assert built["mimelite"]["hooks"] == ftl.MimeLite(cfg.mime_beta)
  assert built["ifca"]["hooks"] == ftl.IFCA(cfg.ifca_models, seed=cfg.seed)
  assert built["qffl"]["hooks"] == ftl.QFFL(cfg.qffl_q, lr=cfg.client_lr)
  assert built["fedlc"]["hooks"] == ftl.FedLC.for_data(tiny_data, cfg.fedlc_tau)
  assert built["moon"]["hooks"] == ftl.MOON(cfg.moon_mu)
  assert built["scaffold"]["hooks"] == ftl.Scaffold(cfg.client_lr)
  assert built["feddyn"]["hooks"] == ftl.FedDyn(cfg.dyn_alpha)
  assert built["fednova"]["hooks"] == ftl.FedNova()
  assert built["fedper"]["local_params"] == "^head" and "hooks" not in built["fedper"]
  assert built["fedrep"]["hooks"] == ftl.algorithms.HeadThenBody("^head", cfg.head_steps)
  assert built["fedbn"]["model_state"] == "local"
  assert isinstance(flags.make_algorithm(dataclasses.replace(cfg, algorithm="ditto"), built["ditto"]), ftl.Ditto)
  bad = [(dict(algorithm="scaffold", client_optimizer="adam"), "client_optimizer=sgd"),
         (dict(algorithm="fedbn"), "no BatchNorm"),
         (dict(algorithm="fedavg", dyn_alpha=0.5), "--dyn_alpha=0.5 is for --algorithm=feddyn"),
         (dict(algorithm="fedrep", ditto_lambda=1.0), "--ditto_lambda"),
         (dict(algorithm="scaffold", dp_clip=1.0, dp_noise_multiplier=1.0, secure_agg=True), "does not cover"),
         (dict(algorithm="fednova", dp_clip=1.0, dp_noise_multiplier=1.0, dp_mechanism="ftrl"), "does not encode"),
         (dict(algorithm="ditto", prune=0.5), "does not combine"),
         (dict(algorithm="qffl", client_optimizer="adam"), "plain SGD"),
         (dict(finetune_steps=3), "--personal_eval"),
         (dict(personal_eval=True, personal_fraction=1.0), "--personal_fraction")]
  for kw, msg in bad:
    with pytest.raises(ConfigError, match=msg):
      digits.validate(dataclasses.replace(cfg, **kw))


def test_digits_ditto_reports_personalized_accuracy_every_round(tmp_path):
  from fedjax_tl.experiments import digits

  cfg = dataclasses.replace(digits.PRESETS["smoke"], algorithm="ditto", rounds=2, pretrain_epochs=1,
                            trainable="head", workdir=str(tmp_path))
  summary = digits.run(cfg, log=lambda *_: None)
  personal = summary["final_personal_accuracy"]
  assert set(personal) == set(summary["final_test_accuracy"])
  for v in personal.values():
    assert all(0.0 <= v[k] <= 1.0 for k in ("weighted_mean", "mean", "p10"))
  import json

  history = json.loads((tmp_path / "results.json").read_text())["history"]["pretrained"]
  assert [h["round"] for h in history] == [1, 2]
  assert all("test_personal_accuracy_p10" in h and "test_accuracy" in h for h in history)


def test_plot_draws_personalized_accuracy(tmp_path):
  import json

  from fedjax_tl.plot import plot_runs

  rows = [{"round": r, "bytes_up": 10, "bytes_down": 10, "test_accuracy": 0.5, "test_personal_accuracy": 0.7,
           "test_personal_accuracy_p10": 0.4} for r in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  names = {p.rsplit("/", 1)[-1] for p in plot_runs([str(tmp_path)])}
  assert "personalized_accuracy_vs_round.png" in names
