"""fedjax_tl: federated (transfer) learning simulated in JAX/Flax.

The flat public API (as optax's): everything a researcher composes an experiment from. Attributes load on
first use, so ``import fedjax_tl`` stays cheap and importing one submodule does not pull in the others::

  import fedjax_tl as ftl
  algo = ftl.FedAvg(ftl.LocalTraining(model, optax.sgd(0.1), batch_size=16))
  state = algo.init(params, model_state)
  state, history = ftl.run_rounds(algo, state, data, rounds=10, cohort_size=5, seed=0)

Layers, bottom to top (each imports only from below; nothing imports ``fedjax_tl.experiments``):
types/keys/tree, data, models, transforms, aggregators, core (client, execution, fedavg), algorithms, privacy,
run (train, checkpoint, metrics).
"""

from __future__ import annotations

import importlib
import os
import re


def _version() -> str:
  """The version in the source checkout's pyproject.toml, else the installed distribution's."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
  try:
    with open(path) as f:
      m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    if m:
      return m.group(1)
  except OSError:
    pass
  from importlib.metadata import PackageNotFoundError, version

  try:
    return version("fedjax_tl")
  except PackageNotFoundError:
    return "unknown"


__version__ = _version()

# public name -> module that defines it
_EXPORTS = {
    # randomness
    "keys": "fedjax_tl.keys",
    # data
    "Dataset": "fedjax_tl.data.client_data",
    "FederatedData": "fedjax_tl.data.client_data",
    "HostFederatedData": "fedjax_tl.data.client_data",
    "Cohort": "fedjax_tl.data.client_data",
    "partition": "fedjax_tl.data.partition",
    "augment": "fedjax_tl.data.augment",
    "load_digits": "fedjax_tl.data.sources",
    "split_by_labels": "fedjax_tl.data.sources",
    "train_test_split": "fedjax_tl.data.sources",
    # models
    "Model": "fedjax_tl.models.base",
    "CNN": "fedjax_tl.models.cnn",
    "ResNet": "fedjax_tl.models.resnet",
    "ResNet18": "fedjax_tl.models.resnet",
    "ResNet50": "fedjax_tl.models.resnet",
    "ResNetTiny": "fedjax_tl.models.resnet",
    "pretrained": "fedjax_tl.models.pretrained",
    "lora": "fedjax_tl.models.peft",
    "LoRA": "fedjax_tl.models.peft",
    "LORA_AND_HEAD": "fedjax_tl.models.peft",
    "fast_cpu": "fedjax_tl.models.fast",
    # TPU planning (libtpu from the [tpu] extra)
    "plan_round": "fedjax_tl.plan",
    # update transforms
    "transforms": "fedjax_tl.transforms",
    "UpdateTransform": "fedjax_tl.transforms.base",
    "chain": "fedjax_tl.transforms.base",
    "compression": "fedjax_tl.transforms.compression",
    "clip_l2": "fedjax_tl.transforms.privacy",
    "gaussian_noise": "fedjax_tl.transforms.privacy",
    "dp_fedavg": "fedjax_tl.transforms.privacy",
    # aggregators
    "aggregators": "fedjax_tl.aggregators",
    "AdaptiveClipping": "fedjax_tl.aggregators",
    "SecureAggregation": "fedjax_tl.aggregators",
    "Mean": "fedjax_tl.aggregators",
    "WeightedMean": "fedjax_tl.aggregators",
    "UniformMean": "fedjax_tl.aggregators",
    "DPFedAvg": "fedjax_tl.aggregators",
    # core
    "LocalTraining": "fedjax_tl.core.client",
    "objectives": "fedjax_tl.objectives",
    "Objective": "fedjax_tl.objectives",
    "client_optimizer": "fedjax_tl.core.client",
    "Schedule": "fedjax_tl.core.execution",
    "store": "fedjax_tl.core.store",
    "HostStore": "fedjax_tl.core.store",
    "FedAvg": "fedjax_tl.core.fedavg",
    "Hooks": "fedjax_tl.core.hooks",
    "TrainContext": "fedjax_tl.core.hooks",
    "ServerView": "fedjax_tl.core.hooks",
    "ChainHooks": "fedjax_tl.core.hooks",
    "LossBatch": "fedjax_tl.core.hooks",
    "chain_hooks": "fedjax_tl.core.hooks",
    "ServerState": "fedjax_tl.core.fedavg",
    "sample_clients": "fedjax_tl.core.fedavg",
    "client_mesh": "fedjax_tl.core.fedavg",
    "split_params": "fedjax_tl.core.params",
    "evaluate": "fedjax_tl.core.evaluate",
    "evaluate_per_client": "fedjax_tl.core.evaluate",
    "client_summary": "fedjax_tl.core.evaluate",
    # named algorithms: adaptive server optimizers (Reddi et al. 2021) and FedProx (Li et al. 2020)
    "algorithms": "fedjax_tl.algorithms",
    "fed_adagrad": "fedjax_tl.algorithms.fedopt",
    "fed_adam": "fedjax_tl.algorithms.fedopt",
    "fed_yogi": "fedjax_tl.algorithms.fedopt",
    "fed_avgm": "fedjax_tl.algorithms.fedopt",
    "server_optimizer": "fedjax_tl.algorithms.fedopt",
    "fedopt": "fedjax_tl.algorithms.fedopt",
    "fedprox": "fedjax_tl.algorithms.fedprox",
    "proximal_term": "fedjax_tl.algorithms.fedprox",
    "Scaffold": "fedjax_tl.algorithms.scaffold",
    "Ditto": "fedjax_tl.algorithms.ditto",
    "DittoOnePass": "fedjax_tl.algorithms.ditto",
    "FedDyn": "fedjax_tl.algorithms.feddyn",
    "FedNova": "fedjax_tl.algorithms.fednova",
    "IFCA": "fedjax_tl.algorithms.ifca",
    "APFL": "fedjax_tl.algorithms.apfl",
    "MimeLite": "fedjax_tl.algorithms.mimelite",
    "MOON": "fedjax_tl.algorithms.moon",
    "FedLC": "fedjax_tl.algorithms.fedlc",
    "QFFL": "fedjax_tl.algorithms.qffl",
    "fedper": "fedjax_tl.algorithms.personal",
    "fedrep": "fedjax_tl.algorithms.personal",
    "fedbn": "fedjax_tl.algorithms.personal",
    # smaller models: pruning and int8 quantization (qwix), after and during federated training
    "compress": "fedjax_tl.compress",
    "magnitude_mask": "fedjax_tl.compress.pruning",
    "polynomial_sparsity": "fedjax_tl.compress.pruning",
    "keep_pruned": "fedjax_tl.compress.pruning",
    "FederatedPruning": "fedjax_tl.compress.federated",
    "ptq": "fedjax_tl.compress.quantize",
    "qat": "fedjax_tl.compress.quantize",
    "size_report": "fedjax_tl.compress.report",
    # privacy: accounting, DP-FTRL (matrix-factorization noise), the canary audit, the run's privacy statement
    "privacy": "fedjax_tl.privacy",
    "epsilon": "fedjax_tl.privacy.accounting",
    "calibrate_noise_multiplier": "fedjax_tl.privacy.accounting",
    "DPFTRL": "fedjax_tl.privacy.dp_ftrl",
    "MFStrategy": "fedjax_tl.privacy.dp_ftrl",
    "ParticipationSampler": "fedjax_tl.privacy.dp_ftrl",
    "participation_violations": "fedjax_tl.privacy.dp_ftrl",
    "CanaryAudit": "fedjax_tl.privacy.audit",
    "audit_mechanism": "fedjax_tl.privacy.audit",
    "privacy_statement": "fedjax_tl.privacy.statement",
    # several processes (JAX's multi-controller runtime): initialize, process_clients, allreduce_sum; a round's
    # cohort split across them, each process holding only its clients' examples
    "distributed": "fedjax_tl.distributed",
    "ProcessData": "fedjax_tl.core.multiprocess",
    # running
    "run_rounds": "fedjax_tl.core.train",
    "DivergenceWarning": "fedjax_tl.core.train",
    "dropouts": "fedjax_tl.core.train",
    "stragglers": "fedjax_tl.core.train",
    "Checkpointer": "fedjax_tl.checkpoint",
    "MetricsWriter": "fedjax_tl.metrics",
    "format_table": "fedjax_tl.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'fedjax_tl' has no attribute {name!r}")
  mod = importlib.import_module(module)
  value = mod if mod.__name__.rsplit(".", 1)[-1] == name and not hasattr(mod, name) else getattr(mod, name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(__all__)
