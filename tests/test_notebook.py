"""notebooks/colab.ipynb runs from top to bottom in smoke mode (FEDJAX_TL_SMOKE=1: tfds mock data, a tiny ResNet,
no pretrained weights), without touching the network."""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel (the notebook's kernel) is not installed: pip install -e '.[test]'")
pytest.importorskip("tensorflow_datasets", reason="the notebook loads CIFAR-10 with tfds: pip install -e '.[tfds]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab.ipynb")

# Run first in the kernel: any connection or name lookup beyond this machine is recorded and refused.
NO_NETWORK = """
import socket
_NETWORK_ATTEMPTS = []
_LOCAL = ("127.0.0.1", "::1", "localhost")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _NETWORK_ATTEMPTS.append(address)
        raise OSError(f"smoke run tried to reach {address}")
    return _connect(self, address)
def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL and host is not None:
        _NETWORK_ATTEMPTS.append(host)
        raise socket.gaierror(f"smoke run tried to look up {host}")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = _guarded_connect, _guarded_getaddrinfo
"""
CHECK = "assert not _NETWORK_ATTEMPTS, _NETWORK_ATTEMPTS"


def _kernel(tmp_path) -> str:
  """A kernel spec for this interpreter, so the notebook runs in this environment whatever else is installed."""
  spec = tmp_path / "jupyter" / "kernels" / "fedjax_tl_test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fedjax_tl test", "language": "python"}))
  return "fedjax_tl_test"


def test_notebook_runs_in_smoke_mode_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("FEDJAX_TL_SMOKE", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # this checkout
  # Compiling dominates the smoke run (one training program per section); unoptimised CPU code compiles about a
  # third faster, and the tiny model's rounds do not notice.
  fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {fast_compile}".strip())
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all("id" in c for c in nb.cells), "every cell needs an id (nbformat 4.5): run nbformat's normalize()"
  nb.cells.insert(0, nbformat.v4.new_code_cell(NO_NETWORK))
  nb.cells.append(nbformat.v4.new_code_cell(CHECK))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=_kernel(tmp_path),
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
  assert "SMOKE=True" in text
  assert "nothing to install" in text
  assert "backend: CPU" in text or "backend: GPU" in text or "backend: TPU" in text
  for name in ("iid", "noniid", "topk", "dp"):
    assert f"{name:7s} final test accuracy" in text, name  # the final comparison lists every run
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5, "every section plots"
