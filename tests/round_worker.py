"""One process of tests/test_distributed.py's federated rounds split across processes (python -m fedjax_tl.launch).

    round_worker.py OUT_DIR CONFIG MODE [ROUNDS] [SAVE_AT]

CONFIG: "store" (FedAvg with a per-client head, local_params="^head/") or "secagg" (the same with
SecureAggregation, whose masks depend on every client's cohort position). MODE: "run" (ROUNDS rounds), "save"
(run, checkpoint at round SAVE_AT and stop there), "resume" (restore the latest checkpoint and run up to ROUNDS),
"die" (process 1 kills itself with SIGKILL after its first round). Each process writes OUT_DIR/result.<index>.npz:
the final params, the per-client heads and every round's metrics; the test compares them with the single-process
run (:func:`run`, called in the test's own process with the whole data).
"""

import os
import signal
import sys

import numpy as np

NUM_CLIENTS, COHORT = 8, 6


def dataset():
  """Eight clients of unequal sizes (1 to 12 examples) over 60 random uint8 8x8 images."""
  from fedjax_tl.data.client_data import Dataset

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (60, 8, 8, 1)).astype(np.uint8)
  y = rng.integers(0, 3, 60).astype(np.int32)
  sizes = [7, 12, 3, 9, 1, 11, 5, 8]
  parts = np.split(rng.permutation(60), np.cumsum(sizes))[:NUM_CLIENTS]
  return Dataset(x, y, 3), [np.sort(p) for p in parts]


def algorithm(config):
  import optax

  import fedjax_tl as ftl
  from fedjax_tl.models.base import Model
  from fedjax_tl.models.cnn import CNN

  model = Model(CNN(num_classes=3, features=(4,), hidden=8), (8, 8, 1))
  local = ftl.LocalTraining(model, optax.sgd(0.1), batch_size=4, epochs=2)
  agg = ftl.aggregators.SecureAggregation(clip_value=2.0) if config == "secagg" else ftl.aggregators.Mean()
  schedule = "sequential" if config == "secagg" else "vmap"
  return model, ftl.FedAvg(local, schedule=schedule, local_params="^head/", aggregator=agg,
                           server_optimizer=optax.adam(0.01))


def run(data, config, rounds, start_state=None, first_round=0, checkpointer=None, save_at=None):
  """Rounds ``first_round .. rounds - 1`` of the test's configuration on ``data``; returns (state, metrics)."""
  import jax

  from fedjax_tl.core.fedavg import sample_clients

  model, algo = algorithm(config)
  state = start_state
  if state is None:
    params, model_state = model.init(jax.random.PRNGKey(0))
    state = algo.init(params, model_state, num_clients=NUM_CLIENTS)
  history = []
  key = jax.random.PRNGKey(1)
  for r in range(first_round, rounds):
    round_key = jax.random.fold_in(key, r)
    ids = sample_clients(jax.random.fold_in(round_key, 7), NUM_CLIENTS, COHORT)
    state, metrics = algo.apply(state, data, ids, round_key)
    history.append({"loss": float(metrics["train_loss"]), "num_examples": float(metrics["num_examples"]),
                    "client_loss": np.asarray(metrics["client_metrics"]["loss"]).tolist()})
    if checkpointer is not None:
      checkpointer.maybe_save(state)
    if save_at is not None and r + 1 == save_at:
      break
  return state, history


def template(config):
  import jax

  model, algo = algorithm(config)
  params, model_state = model.init(jax.random.PRNGKey(0))
  return algo.init(params, model_state, num_clients=NUM_CLIENTS)


def save(path, state, history):
  import jax

  flat = {f"params/{jax.tree_util.keystr(k)}": np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  flat.update({f"heads/{jax.tree_util.keystr(k)}": np.asarray(v)
               for k, v in jax.tree_util.tree_leaves_with_path(state.client_params)})
  flat.update({f"opt/{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(state.opt_state))})
  np.savez(path, round=int(state.round), loss=np.array([h["loss"] for h in history]),
           client_loss=np.array([h["client_loss"] for h in history]), **flat)


def main():
  import fedjax_tl as ftl

  index, count = ftl.distributed.initialize()
  out, config, mode = sys.argv[1], sys.argv[2], sys.argv[3]
  rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
  save_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
  full, parts = dataset()
  data = ftl.ProcessData.for_process(full, parts)
  # This process holds only its own clients' examples, and only theirs.
  mine = ftl.distributed.process_clients(NUM_CLIENTS)
  assert data.num_clients == NUM_CLIENTS and list(data.client_ids) == list(mine)
  take = np.concatenate([parts[c] for c in mine])
  assert np.array_equal(np.asarray(data.x), full.x[take]), "holds other clients' examples"
  print(f"HOLDS {len(take)} of {len(full)} examples, clients {mine.tolist()}", flush=True)
  checkpointer = None
  start, first = None, 0
  if mode in ("save", "resume"):
    checkpointer = ftl.Checkpointer(os.path.join(out, "work"), {"config": config}, every=1)
  if mode == "resume":
    start = checkpointer.restore(template(config))
    first = int(start.round)
    print(f"RESUMED at round {first}", flush=True)
  if mode == "die":
    state, history = run(data, config, 1)
    if index == 1:
      print("DYING", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    run(data, config, rounds, start_state=state, first_round=1)  # blocks in the next round's collective
    return
  state, history = run(data, config, rounds, start, first, checkpointer, save_at)
  if checkpointer is not None:
    checkpointer.close()
  save(os.path.join(out, f"result.{index}.npz"), state, history)
  print(f"DONE round {int(state.round)}", flush=True)


if __name__ == "__main__":
  main()
