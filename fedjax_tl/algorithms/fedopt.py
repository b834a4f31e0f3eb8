"""Adaptive server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.

Each is an optax ``GradientTransformation`` for :class:`~fedjax_tl.FedAvg`'s ``server_optimizer``: it receives
the pseudo-gradient ``g_t = -Delta_t`` (minus the weighted mean client delta) and returns the server's update.
With ``Delta_t = -g_t``, the paper's equations read::

  m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
  v_t = v_{t-1} + Delta_t^2                                              (FedAdagrad)
  v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2                        (FedAdam)
  v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)    (FedYogi)
  x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper asks for ``v_{-1} >= tau^2``; ``initial_accumulator``
overrides it). Unlike ``optax.adam`` there is NO bias correction of ``m`` or ``v``, and ``tau`` (the degree of
adaptivity) is added outside the square root. ``fed_adam(..., bias_correction=True)`` is ``optax.adam`` instead
(bias-corrected moments, ``v_{-1} = 0``, ``eps = tau``).

The factories are cached: equal hyper-parameters give the same optimizer object, so equal FedAvg configurations
compare equal and share their compiled programs.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.types import Updates

__all__ = ["AdaptiveState", "fed_adagrad", "fed_adam", "fed_yogi", "fed_avgm", "SERVER_OPTIMIZERS",
           "server_optimizer", "fedopt"]


class AdaptiveState(NamedTuple):
  m: Updates  # first moment of the mean delta
  v: Updates  # second moment (per coordinate)


def _adaptive(second_moment, eta: float, beta1: float, beta2: float, tau: float,
              initial_accumulator: float | None) -> optax.GradientTransformation:
  v0 = tau**2 if initial_accumulator is None else initial_accumulator

  def init(params):
    return AdaptiveState(jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda p: jnp.full_like(p, v0), params))

  def update(updates, state, params=None):
    del params
    delta = jax.tree.map(lambda g: -g, updates)  # the mean client delta
    m = jax.tree.map(lambda m, d: beta1 * m + (1 - beta1) * d, state.m, delta)
    v = jax.tree.map(lambda v, d: second_moment(v, d * d, beta2), state.v, delta)
    out = jax.tree.map(lambda m, v: (eta * m / (jnp.sqrt(v) + tau)).astype(m.dtype), m, v)
    return out, AdaptiveState(m, v)

  return optax.GradientTransformation(init, update)


@functools.cache
def fed_adagrad(eta: float, beta1: float = 0.0, tau: float = 1e-3,
                initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """FedAdagrad (Reddi et al. 2021, Alg. 2): ``v_t = v_{t-1} + Delta_t^2``; no bias correction.

  Args:
    eta: server learning rate.
    beta1: momentum of the mean delta (0: none, plain Adagrad; Algorithm 2 allows any value in [0, 1)).
    tau: adaptivity, added to ``sqrt(v_t)``.
    initial_accumulator: ``v_{-1}`` (default ``tau**2``).
  """
  return _adaptive(lambda v, d2, b2: v + d2, eta, beta1, 0.0, tau, initial_accumulator)


@functools.cache
def fed_adam(eta: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
             initial_accumulator: float | None = None, bias_correction: bool = False) -> optax.GradientTransformation:
  """FedAdam (Reddi et al. 2021, Alg. 2): ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2``.

  No bias correction (unlike ``optax.adam``) unless ``bias_correction=True``, which returns
  ``optax.adam(eta, beta1, beta2, eps=tau)`` (``initial_accumulator`` must then be None: optax starts at 0).
  """
  if bias_correction:
    if initial_accumulator is not None:
      raise ValueError("bias_correction=True is optax.adam, whose second moment starts at 0: drop "
                       "initial_accumulator.")
    return optax.adam(eta, b1=beta1, b2=beta2, eps=tau)
  return _adaptive(lambda v, d2, b2: b2 * v + (1 - b2) * d2, eta, beta1, beta2, tau, initial_accumulator)


@functools.cache
def fed_yogi(eta: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
             initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """FedYogi (Reddi et al. 2021, Alg. 2; Yogi of Zaheer et al. 2018):
  ``v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``; no bias correction."""
  return _adaptive(lambda v, d2, b2: v - (1 - b2) * d2 * jnp.sign(v - d2), eta, beta1, beta2, tau,
                   initial_accumulator)


@functools.cache
def fed_avgm(eta: float, momentum: float = 0.9) -> optax.GradientTransformation:
  """FedAvgM (Hsu et al. 2019): server SGD with heavy-ball momentum on the pseudo-gradient,
  ``optax.sgd(eta, momentum)``."""
  return optax.sgd(eta, momentum=momentum)


@functools.cache
def _fedavg(eta: float = 1.0) -> optax.GradientTransformation:
  return optax.sgd(eta)


# Server optimizers by name: name -> (server learning rate, **hyper-parameters) -> optax optimizer.
SERVER_OPTIMIZERS = {
    "fedavg": _fedavg,
    "fedavgm": fed_avgm,
    "fedadagrad": fed_adagrad,
    "fedadam": fed_adam,
    "fedyogi": fed_yogi,
}


def server_optimizer(name: str, eta: float, **hparams: Any) -> optax.GradientTransformation:
  """The server optimizer ``name`` (one of ``SERVER_OPTIMIZERS``) with server learning rate ``eta``."""
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f"Unknown server optimizer {name!r}; choose one of {sorted(SERVER_OPTIMIZERS)}.")
  return SERVER_OPTIMIZERS[name](eta, **hparams)


def fedopt(name: str, local: LocalTraining, eta: float, hparams: dict | None = None,
           **fedavg_kwargs: Any) -> FedAvg:
  """``FedAvg(local, server_optimizer=server_optimizer(name, eta, **hparams), **fedavg_kwargs)``.

  Example: ``fedopt("fedadam", local, 0.01, {"tau": 1e-3}, schedule="vmap")``.
  """
  return FedAvg(local, server_optimizer=server_optimizer(name, eta, **(hparams or {})), **fedavg_kwargs)
