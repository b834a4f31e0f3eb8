"""Named PRNG streams (fedjax_tl.keys) and the public API's layering."""

import ast
import pathlib
import re

import jax
import numpy as np
import optax

import fedjax_tl
from fedjax_tl import keys
from fedjax_tl.transforms.base import UpdateTransform

CLIENT_IDS = [0, 1, 7, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, 2**31 - 1]


def _bits(k):
  return tuple(np.asarray(jax.random.key_data(k) if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) else k))


def test_unchanged_streams_are_bit_identical_to_the_old_derivations():
  root = jax.random.PRNGKey(3)
  assert _bits(keys.sampling(3, 5)) == _bits(jax.random.fold_in(jax.random.fold_in(root, 0), 5))
  rk = keys.round_key(3, 5)
  assert _bits(rk) == _bits(jax.random.fold_in(jax.random.fold_in(root, 1), 5))
  ck = keys.client(rk, 9)
  assert _bits(ck) == _bits(jax.random.fold_in(rk, 9))
  assert _bits(keys.step(ck, 4)) == _bits(jax.random.fold_in(jax.random.fold_in(ck, 1 << 20), 4))
  assert _bits(keys.postprocess(ck)) == _bits(jax.random.fold_in(ck, 2 << 20))


def test_server_streams_are_disjoint_from_every_client_key():
  rk = keys.round_key(0, 0)
  clients = {_bits(keys.client(rk, c)) for c in CLIENT_IDS} | {_bits(keys.client(rk, np.int32(-1)))}
  servers = {_bits(keys.server(rk, s)) for s in keys.SERVER_STREAMS}
  assert len(servers) == len(keys.SERVER_STREAMS)
  assert not clients & servers


def test_dp_noise_key_is_no_clients_key(tiny_data, tiny_local, tiny_params):
  """Old code: the server transform (DP noise) drew with fold_in(round_key, 3 << 20), which is the training key
  of client 3 << 20. A recording server transform shows which key FedAvg hands it."""
  record = UpdateTransform(lambda u: np.zeros(2, np.uint32),
                           lambda u, s, k: (u, jax.random.key_data(k) if k.dtype != np.uint32 else k))
  algo = fedjax_tl.FedAvg(tiny_local, schedule="sequential", server_transform=record)
  round_key = jax.random.PRNGKey(0)
  state, _ = algo.apply(algo.init(*tiny_params), tiny_data, np.array([0, 1]), round_key)
  used = tuple(np.asarray(state.server_transform_state))
  for c in CLIENT_IDS:  # how the execution layer keys client c (tests/test_execution.py's reference)
    assert used != _bits(jax.random.fold_in(round_key, c)), c


def test_public_api_resolves_and_has_the_version():
  text = (pathlib.Path(fedjax_tl.__file__).parents[1] / "pyproject.toml").read_text()
  assert fedjax_tl.__version__ == re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
  for name in fedjax_tl.__all__:
    assert getattr(fedjax_tl, name) is not None, name
  assert fedjax_tl.FedAvg is fedjax_tl.core.fedavg.FedAvg
  assert isinstance(fedjax_tl.client_optimizer("sgd", 0.1), optax.GradientTransformation)


def test_library_never_imports_the_entry_points():
  package = pathlib.Path(fedjax_tl.__file__).parent
  offenders = []
  for path in package.rglob("*.py"):
    if "experiments" in path.relative_to(package).parts:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
          [node.module or ""] if isinstance(node, ast.ImportFrom) else []
      offenders += [f"{path.name}: {n}" for n in names if n.startswith("fedjax_tl.experiments")]
  assert not offenders
