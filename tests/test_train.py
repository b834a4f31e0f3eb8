from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.core import train
from fedjax_tl.core.client import LocalTraining
from fedjax_tl.core.fedavg import FedAvg
from fedjax_tl.core.train import CompileTimer, run_rounds


class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


class _PendingUpdate:
  """A state leaf whose server update is still running: waiting for it takes 3 (fake) seconds."""

  def __init__(self, clock: _FakeClock):
    self.clock = clock

  def block_until_ready(self):
    self.clock.now += 3.0
    return self


class _State(NamedTuple):
  round: int
  pending: _PendingUpdate


class _AsyncServerAlgorithm:
  """apply() returns at once (1 s of client work) while its new state is still being computed."""

  def __init__(self, clock: _FakeClock):
    self.clock = clock

  def apply(self, state, data, ids, key):
    del data, ids, key
    self.clock.now += 1.0
    metrics = {"train_loss": 0.5, "train_accuracy": 0.5, "num_examples": 8, "bytes_up": 0, "bytes_down": 0}
    return _State(state.round + 1, _PendingUpdate(self.clock)), metrics


class _NoCompileTimer(CompileTimer):
  seconds = 0.0


class _Data:
  num_clients = 4


def test_wall_time_includes_the_server_update(monkeypatch):
  """Round time runs until the new server state is ready, not until the training loss is read."""
  clock = _FakeClock()
  monkeypatch.setattr(train.time, "perf_counter", clock)
  monkeypatch.setattr(train, "CompileTimer", _NoCompileTimer)  # real compile time is not on the fake clock
  _, hist = run_rounds(_AsyncServerAlgorithm(clock), _State(0, None), _Data(), rounds=2, cohort_size=2, seed=0)
  assert [h["wall_s"] for h in hist] == [4.0, 4.0]  # 1 s of client work + 3 s of server update
  assert [h["examples_per_s"] for h in hist] == [2.0, 2.0]


def test_compile_time_is_reported_apart_from_round_time(tiny_model, tiny_data, tiny_params):
  params, state = tiny_params
  algo = FedAvg(LocalTraining(tiny_model, optax.sgd(0.1), 4), schedule="sequential/host:2")
  _, hist = run_rounds(algo, algo.init(params, state), tiny_data, rounds=3, cohort_size=5, seed=0)
  assert hist[0]["compile_s"] > 0  # the first round traces and compiles every program
  assert [h["compile_s"] for h in hist[1:]] == [0.0, 0.0]  # the others reuse them
  assert all(h["wall_s"] >= 0 for h in hist)


def test_compile_timer_counts_nested_compilations_once():
  t = CompileTimer()
  trace, compile_ = train._COMPILE_EVENTS[0], train._COMPILE_EVENTS[2]
  t._on_span(trace, 0.0, 10.0)  # an outer trace ...
  t._on_span(trace, 2.0, 5.0)  # ... with a jitted function traced inside it
  t._on_span(compile_, 8.0, 12.0)  # overlapping the end
  t._on_span(compile_, 20.0, 21.5)
  t._on_span("/jax/something/else", 30.0, 40.0)  # not compilation
  assert t.seconds == 13.5  # [0, 12] and [20, 21.5]
  f = jax.jit(lambda v: jnp.sin(v) * 3)
  with CompileTimer() as first:
    f(jnp.arange(3.0)).block_until_ready()
  with CompileTimer() as again:
    f(jnp.arange(3.0)).block_until_ready()  # cached: nothing compiles
  assert first.seconds > 0 and again.seconds == 0.0
