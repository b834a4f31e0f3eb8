"""Federated transfer learning on CIFAR-10 (or any tfds image dataset) from an ImageNet ResNet50.

Presets (override any field with --field=value):
  seed    the article's setting: 5 clients, strided IID split (x[i::5]), ResNet50 with ImageNet weights
          + global average pooling + Dense(128, relu) + Dense(10), Adam(1e-3), batch 32, 5 local epochs,
          10 rounds, test accuracy at the end. Done correctly: the global model is sent to every client at
          the start of each round (the article's loop never did this).
  noniid  100 clients, Dirichlet(alpha=0.1) label skew, 10 clients per round, SGD, crop+flip augmentation.
  smoke   offline: tfds mock data, a tiny ResNet without pretrained weights, 2 rounds; under a minute on CPU.

    python -m fedjax_tl.experiments.cifar10                          # = --preset=seed
    python -m fedjax_tl.experiments.cifar10 --preset=noniid --strategy=last:1 --bn=local
    python -m fedjax_tl.experiments.cifar10 --preset=smoke --workdir=/tmp/smoke
    python -m fedjax_tl.experiments.cifar10 --weights_path=/data/resnet50_notop.h5 --data_dir=/data/tfds
    python -m fedjax_tl.experiments.cifar10 --preset=noniid --compress=topk:0.01 --downlink=int8
    python -m fedjax_tl.experiments.cifar10 --preset=noniid --bn=frozen --dp_clip=1.0 --dp_epsilon=8
    python -m fedjax_tl.experiments.cifar10 --image_size=224 --dtype=bfloat16      # mixed precision on GPU/TPU
    python -m fedjax_tl.experiments.cifar10 --preset=smoke --prune=0.5 --quantize=int8_qat   # smaller models
    python -m fedjax_tl.experiments.cifar10 --preset=noniid --algorithm=fedbn      # or scaffold, ditto, ...

Offline: pass the Keras weights file with --weights_path (or $FEDJAX_TL_RESNET50_WEIGHTS) and a prepared
tfds directory with --data_dir; otherwise the run stops at the first download with a message saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import ClassVar

import jax
import numpy as np

from fedjax_tl.compress.flags import CompressFlags, compress_report, compress_setup
from fedjax_tl.core.client import LocalTraining, client_optimizer
from fedjax_tl.core.evaluate import evaluate
from fedjax_tl.core.fedavg import MODEL_STATE_MODES
from fedjax_tl.data import augment, partition
from fedjax_tl.data.client_data import FederatedData
from fedjax_tl.data.sources import load_tfds
from fedjax_tl.experiments.algorithms import (
  PERSONALIZED,
  AlgorithmFlags,
  algorithm_kwargs,
  make_algorithm,
  personal_eval,
)
from fedjax_tl.experiments.common import (
  DTYPES,
  ConfigError,
  TransformFlags,
  cli_main,
  fedavg_kwargs,
  format_table,
  parse_config,  # noqa: F401 (cifar10.parse_config: used by scripts and tests)
  privacy_setup,
  run_in_workdir,
  transform_setup,
  write_results,
)
from fedjax_tl.experiments.common import validate as validate_config
from fedjax_tl.experiments.rules import check, installed, parse_ints, rule
from fedjax_tl.experiments.workdir import WorkdirStatus, finished
from fedjax_tl.models import peft, pretrained, resnet, transfer, weights
from fedjax_tl.models.base import Model

BACKBONES = {"resnet18": resnet.ResNet18, "resnet34": resnet.ResNet34, "resnet50": resnet.ResNet50,
             "resnet101": resnet.ResNet101, "resnet152": resnet.ResNet152, "tiny": resnet.ResNetTiny}


@dataclasses.dataclass(frozen=True)
class Config(AlgorithmFlags, TransformFlags, CompressFlags):  # + algorithm and its flags; compress, dp_*, ...
  EXPERIMENT: ClassVar[str] = "cifar10"  # what a work directory records (fedjax_tl.experiments.workdir)
  seed: int = 0
  # data
  dataset: str = "cifar10"
  data_dir: str | None = None
  mock_data: bool = False  # tfds.testing.mock_data instead of the real files (offline smoke runs)
  mock_examples: int = 64
  max_train_examples: int = 0  # 0 = all
  max_test_examples: int = 0
  # model
  model: str = "resnet50"
  norm: str = "batch"
  weights: str = "imagenet"  # "imagenet" (Keras Applications ResNet50 .h5), "timm" (timm resnet50.a1_in1k
  #                            safetensors, v1.5 architecture, 80.4% ImageNet top-1) or "none"
  weights_path: str | None = None
  image_size: int = 32  # model input size; stored images are resized on device inside the step
  head_hidden: str = "128"
  dtype: str = "float32"  # computation dtype: float32 | bfloat16 (mixed precision for GPU/TPU; params stay f32)
  # transfer
  strategy: str = "full"  # full | head | bn+head | last:K | lora:R (adapters of rank R on every convolution)
  bn: str = "average"  # average | frozen | local
  # federation
  num_clients: int = 5
  partition: str = "strided"
  alpha: float = 0.1
  clients_per_round: int = 5
  rounds: int = 10
  local_epochs: int = 5
  batch_size: int = 32
  client_optimizer: str = "adam"
  client_lr: float = 1e-3
  server_lr: float = 1.0
  augment: bool = False
  schedule: str = "auto"
  eval_batch_size: int = 256
  workdir: str | None = None  # metrics (JSONL, CSV, TensorBoard), checkpoints and results.json go here
  resume: bool = False  # continue from the latest checkpoint in workdir
  checkpoint_every: int = 1
  keep_checkpoints: int = 3
  quiet: bool | None = None  # no progress bar; none = a bar when stderr is a terminal


PRESETS = {
    "seed": Config(),
    "noniid": Config(num_clients=100, partition="dirichlet", alpha=0.1, clients_per_round=10, rounds=100,
                     local_epochs=1, client_optimizer="momentum", client_lr=0.01, augment=True),
    "smoke": Config(mock_data=True, mock_examples=96, model="tiny", weights="none", num_clients=4,
                    partition="iid", clients_per_round=2, rounds=2, local_epochs=1, batch_size=16,
                    head_hidden="16", schedule="sequential/host:1", quiet=True),
}


TFDS_HINT = 'pip install -e ".[tfds]"'


# The experiment's own rules in the experiments' flag table (fedjax_tl.experiments.rules); "plan" is the TPU
# planner, which takes these flags too.
@rule("model", "weights", "norm", "dtype", "bn", experiments=("cifar10", "plan"),
      bad=[["--model=vgg16"], ["--weights=keras"], ["--model=resnet18", "--weights=imagenet"],
           ["--norm=group", "--weights=imagenet", "--model=resnet50"], ["--dtype=float16"], ["--bn=shared"]])
def _model_flags(cfg):
  check(cfg.model in BACKBONES, f"--model={cfg.model!r} is unknown; choose one of {sorted(BACKBONES)}.")
  check(cfg.weights in ("imagenet", "timm", "none"), f"--weights must be 'imagenet', 'timm' or 'none', got "
        f"{cfg.weights!r}.")
  check(cfg.weights == "none" or (cfg.model == "resnet50" and cfg.norm == "batch"),
        "ImageNet weights exist for --model=resnet50 with --norm=batch only; use --weights=none for "
        f"--model={cfg.model}, --norm={cfg.norm}.")
  check(cfg.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}.")
  check(cfg.bn in MODEL_STATE_MODES, f"--bn must be one of {MODEL_STATE_MODES}, got {cfg.bn!r}.")


@rule("strategy", "prune", "quantize", "algorithm", experiments=("cifar10", "plan"),
      bad=[["--strategy=last:9"], ["--strategy=top"], ["--strategy=lora:2", "--prune=0.5"],
           ["--strategy=lora:2", "--algorithm=fedper"]])
def _strategy(cfg):
  try:
    transfer.trainable_pattern(cfg.strategy)
  except ValueError as e:
    raise ConfigError(f"--strategy: {e}") from None
  check(not transfer.lora_rank(cfg.strategy) or (cfg.prune == 0 and cfg.quantize == "none"),
        f"--strategy={cfg.strategy} trains adapters over frozen weights; --prune/--quantize act on the whole model "
        "and do not combine with it yet.")
  check(not transfer.lora_rank(cfg.strategy) or cfg.algorithm not in ("fedbn", "fedper", "fedrep"),
        f"--algorithm={cfg.algorithm} names layers of the plain model; use it with a strategy other than lora:R.")


@rule("image_size", "head_hidden", "mock_examples", "eval_batch_size", "max_train_examples", "max_test_examples",
      experiments=("cifar10", "plan"),
      bad=[["--image_size=0"], ["--image_size=-5"], ["--head_hidden=0"], ["--head_hidden=x"], ["--mock_examples=0"],
           ["--eval_batch_size=0"], ["--max_train_examples=-1"], ["--max_test_examples=-2"]])
def _sizes(cfg):
  check(cfg.image_size >= 1, f"--image_size must be a positive number of pixels (e.g. 32 or 224), got "
        f"{cfg.image_size}.")
  hidden = parse_ints(cfg.head_hidden, "head_hidden")
  check(all(h >= 1 for h in hidden), f"--head_hidden={cfg.head_hidden!r}: layer widths must be positive.")
  for name in ("mock_examples", "eval_batch_size"):
    check(getattr(cfg, name) >= 1, f"--{name} must be a positive integer, got {getattr(cfg, name)}.")
  for name in ("max_train_examples", "max_test_examples"):
    check(getattr(cfg, name) >= 0, f"--{name} must be >= 0 (0 = all), got {getattr(cfg, name)}.")


def _has_batch_norm(cfg) -> bool:
  return cfg.norm == "batch" or cfg.weights == "timm"


@rule("algorithm", "bn", "norm", experiments=("cifar10", "plan"),
      bad=[["--algorithm=fedbn", "--norm=group"], ["--algorithm=fedbn", "--bn=frozen"]])
def _fedbn(cfg):
  check(cfg.algorithm != "fedbn" or _has_batch_norm(cfg), f"--algorithm=fedbn keeps BatchNorm layers local, but "
        f"--norm={cfg.norm} has no BatchNorm; use fedper or fedrep (or --norm=batch).")
  check(cfg.algorithm != "fedbn" or cfg.bn in ("average", "local"),
        f"--algorithm=fedbn keeps the BatchNorm statistics local: drop --bn={cfg.bn}.")


# (--secure_agg=true with --bn=average is no longer refused: secure aggregation masks the BatchNorm statistics with
# the delta, in the message's mean part; every statistic must then lie within --secagg_clip like the deltas.)


@rule("weights_path", experiments=("cifar10",), bad=[["--weights_path=/nonexistent.h5"]])
def _weights_path(cfg):
  check(not cfg.weights_path or os.path.isfile(cfg.weights_path),
        f"--weights_path={cfg.weights_path} does not exist.")


@rule("dataset", experiments=("cifar10",), bad=[])  # broken only without tensorflow-datasets: see tests/test_cli.py
def _tfds_installed(cfg):
  check(installed("tensorflow_datasets"),
        f"the {cfg.dataset!r} data come from tensorflow-datasets, which is not installed: {TFDS_HINT} (the tfds "
        "extra).")


def validate(cfg: Config) -> WorkdirStatus:
  """Every flag checked before weights or data are loaded (the flag table of :mod:`fedjax_tl.experiments.rules`),
  then the work directory; raises ConfigError naming the flag and the fix."""
  return validate_config(cfg, "cifar10")


def make_model(cfg: Config, num_classes: int, sample_shape: tuple[int, ...]) -> Model:
  hidden = tuple(int(h) for h in cfg.head_hidden.split(",") if h.strip())
  dtype = DTYPES[cfg.dtype]
  backbone = (resnet.ResNet50Torch(dtype=dtype) if cfg.weights == "timm"
              else BACKBONES[cfg.model](norm=cfg.norm, dtype=dtype))
  module = resnet.ClassifierHead(backbone, num_classes=num_classes, hidden=hidden, dtype=dtype,
                                 representation=cfg.algorithm == "moon")
  size = cfg.image_size if cfg.image_size != sample_shape[0] else None
  preprocess = resnet.torch_preprocess if cfg.weights == "timm" else resnet.caffe_preprocess
  return Model(module, sample_shape, preprocess=augment.with_resize(preprocess, size))


def load_pretrained(cfg: Config, log=print):
  """The backbone's pretrained (params, model_state), or None for weights="none"."""
  if cfg.weights == "none":
    return None
  t = time.perf_counter()
  load = weights.load_torch_resnet50 if cfg.weights == "timm" else weights.load_keras_resnet50
  params, state = load(cfg.weights_path)
  log(f"loaded {cfg.weights} ResNet50 weights ({time.perf_counter() - t:.1f}s)")
  return {"backbone": params}, {"batch_stats": {"backbone": state["batch_stats"]}}


def init_params(cfg: Config, model: Model, loaded):
  """Fresh init, with every backbone parameter and statistic replaced by the pretrained ones (the head stays
  fresh); any other mismatch is an error naming the parameter."""
  params, state = model.init(jax.random.PRNGKey(cfg.seed))
  if loaded is not None:
    try:
      params = pretrained.merge(params, loaded[0], dont_load=["^head"])
      state = pretrained.merge(state, loaded[1])
    except pretrained.WeightMismatchError as e:
      where = cfg.weights_path or "the downloaded file"
      raise pretrained.WeightMismatchError(
          f"The {cfg.weights} weights ({where}) do not fit model={cfg.model}: is it the right file "
          f"(--weights=imagenet: Keras's {weights.KERAS_RESNET50_NOTOP.filename}; --weights=timm: timm's "
          f"resnet50.a1_in1k safetensors)? Pass it with --weights_path, or use --weights=none. {e}") from None
  return params, state


def load_data(cfg: Config):
  ctx = contextlib.nullcontext()
  if cfg.mock_data:
    import tensorflow_datasets as tfds

    ctx = tfds.testing.mock_data(num_examples=cfg.mock_examples)
  try:
    with ctx:
      train = load_tfds(cfg.dataset, "train", cfg.data_dir)
      test = load_tfds(cfg.dataset, "test", cfg.data_dir)
  except ValueError as e:  # unknown dataset, or not an image classification one
    raise ConfigError(f"--dataset={cfg.dataset}: {e}") from None
  if cfg.max_train_examples:
    train = train.subset(np.arange(min(cfg.max_train_examples, len(train))))
  if cfg.max_test_examples:
    test = test.subset(np.arange(min(cfg.max_test_examples, len(test))))
  return train, test


def run(cfg: Config, log=print) -> dict:
  status = validate(cfg)
  if status.action == "done":  # --resume=true of a run that already holds --rounds: report it, write nothing
    return finished(cfg, status, log)
  if status.note:
    log(f"note: {status.note}")
  t_start = time.perf_counter()
  # Weights first: offline, the run stops at this download with a message saying how to provide the file.
  loaded = load_pretrained(cfg, log)
  train, test = load_data(cfg)
  model = make_model(cfg, train.num_classes, train.x.shape[1:])
  params, state = init_params(cfg, model, loaded)
  if transfer.lora_rank(cfg.strategy):  # adapters over the loaded weights, which stay frozen underneath
    model = peft.lora(model, rank=transfer.lora_rank(cfg.strategy))
    params = model.attach(params, jax.random.PRNGKey(cfg.seed + 1))
  log(f"{cfg.dataset}: {len(train)} train / {len(test)} test, {train.num_classes} classes, images "
      f"{train.x.shape[1:]} -> model input {cfg.image_size}; {cfg.num_clients} clients ({cfg.partition})")

  try:
    parts = partition.make_partition(cfg.partition, train.y, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha)
  except ValueError as e:
    raise ConfigError(f"--partition={cfg.partition}, --num_clients={cfg.num_clients}: {e}") from None
  data = FederatedData.from_partition(train, parts)
  personal = cfg.personal_eval or cfg.algorithm in PERSONALIZED
  held = None
  if personal:  # every client holds out part of its own examples for its personalized accuracy
    data, held = data.split_clients(cfg.personal_fraction, cfg.seed)
  local = LocalTraining(model, client_optimizer(cfg.client_optimizer, cfg.client_lr), cfg.batch_size,
                        epochs=cfg.local_epochs, augment=augment.random_crop_flip if cfg.augment else None)
  privacy = privacy_setup(cfg, data.num_clients, log)
  transform_kwargs, round_metrics = transform_setup(cfg, data.num_clients, log, privacy=privacy)
  transform_kwargs, pruning = compress_setup(cfg, {**algorithm_kwargs(cfg, local, data), **transform_kwargs}, log)
  params = pruning.prune(params) if pruning is not None else params
  algo = make_algorithm(cfg, fedavg_kwargs(transform_kwargs), schedule=cfg.schedule,
                        trainable=transfer.trainable_pattern(cfg.strategy), model_state=cfg.bn)
  algo, run_data = privacy.attach(algo, data)  # with --dp_audit: the canary clients join the population
  server = algo.init(params, state, num_clients=run_data.num_clients)
  down, up = algo.communication_bytes(server)
  log(f"algorithm={cfg.algorithm} strategy={cfg.strategy} bn={cfg.bn} schedule={algo.schedule}: "
      f"{up / 1e6:.2f} MB up and "
      f"{down / 1e6:.2f} MB down per client per round")
  test_x, test_y = test.x, test.y
  per_client = personal_eval(cfg, model, transform_kwargs["local"], data, held, cfg.eval_batch_size) if personal \
      else None

  def eval_fn(s):
    out = evaluate(model, s.full_params(), s.model_state, test_x, test_y, cfg.eval_batch_size)
    return out if per_client is None else {**out, **per_client(s)}

  header = ["round", "train_loss", "train_acc", "test_acc", "MB_up", "wall_s", "examples/s"]
  log("  ".join(header))

  def on_round(rec, _):
    log(f"{rec['round']:5d}  {rec['train_loss']:10.4f}  {rec['train_accuracy']:9.4f}  "
        f"{rec.get('test_accuracy', float('nan')):8.4f}  {rec['bytes_up'] / 1e6:5.1f}  {rec['wall_s']:6.1f}  "
        f"{rec['examples_per_s']:10.1f}")

  server, history = run_in_workdir(cfg, algo, server, run_data, rounds=cfg.rounds,
                                   cohort_size=cfg.clients_per_round, evaluate_fn=eval_fn, workdir=cfg.workdir,
                                   log=log, on_round=on_round, round_metrics=round_metrics, sampler=privacy.sampler,
                                   state_metrics=privacy.state_metrics(cfg.rounds, cfg.dp_delta))
  cols = ["round", "train_loss", "train_accuracy", "test_accuracy", "bytes_up", "wall_s", "examples_per_s"]
  log(format_table(cols, [[h.get(c, "") for c in cols] for h in history]))
  final = history[-1]["test_accuracy"]
  summary = {"final_test_accuracy": final, "rounds": cfg.rounds, "seconds": time.perf_counter() - t_start,
             "mb_up_total": history[-1]["mb_up_total"], "mb_down_total": history[-1]["mb_down_total"],
             "mean_examples_per_s": float(np.mean([h["examples_per_s"] for h in history[1:] or history]))}
  log(f"final test accuracy {final:.4f} after {cfg.rounds} rounds ({summary['seconds']:.1f}s)")
  audit = {k: v for k, v in history[-1].items() if k.startswith(("epsilon_audit", "audit_"))} or None
  summary["privacy"] = privacy.statement(algo, cfg.rounds, cfg.dp_delta, bool(jax.tree.leaves(state)), audit)
  if round_metrics is not None:
    log("privacy statement: " + summary["privacy"]["text"])
  if personal:
    last = history[-1]
    summary["final_personal_accuracy"] = {k: last[f"test_personal_accuracy{s}"]
                                          for k, s in (("weighted_mean", ""), ("mean", "_mean"), ("p10", "_p10"))}
    log(f"personalized accuracy ({cfg.algorithm}; clients' own held-out examples): "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_personal_accuracy"].items()))
  if cfg.quantize != "none" or cfg.prune > 0:
    rows = compress_report(cfg, model, server.full_params(), server.model_state, test_x, test_y)
    log("compressed model:\n" + format_table(list(rows[0]), [list(r.values()) for r in rows]))
    summary["compression"] = rows
  write_results(cfg.workdir, cfg, history, summary, log)
  return summary


def main(argv=None) -> None:
  """The command line: bad flags end with a usage error (exit 2) before weights or data are loaded."""
  cli_main(run, Config, PRESETS, argv, __doc__.splitlines()[0], validate)


if __name__ == "__main__":
  main(sys.argv[1:])
