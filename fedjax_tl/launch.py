"""Starts N local processes that join one JAX multi-controller run (fedjax_tl.distributed.initialize()).

    python -m fedjax_tl.launch --processes=2 -- python my_run.py --flag=value

Each process gets the coordinator address (a free port on 127.0.0.1), the number of processes and its id in
fedjax_tl.distributed.ENV; its output lines are prefixed with ``[i]``. If one process fails, the others are
stopped; the exit code is the first failure's (0 when all succeed). For a TPU pod slice or a SLURM cluster use the
platform's own launcher instead (see fedjax_tl.distributed).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from fedjax_tl.distributed import ENV


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], processes: int, timeout: float | None = None, env: dict | None = None,
           out=sys.stdout) -> int:
  """Runs ``command`` as ``processes`` processes of one run; returns the exit code (see the module docstring)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}.")
  if not command:
    raise ValueError("Give the command to run after --, e.g. python -m fedjax_tl.launch --processes=2 -- python "
                     "run.py")
  address = f"127.0.0.1:{free_port()}"
  procs, lock = [], threading.Lock()
  for i in range(processes):
    penv = {**os.environ, **(env or {}), ENV[0]: address, ENV[1]: str(processes), ENV[2]: str(i)}
    procs.append(subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

  def pump(i, p):
    for line in p.stdout:
      with lock:
        out.write(f"[{i}] {line}")
        out.flush()

  threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  deadline = None if timeout is None else time.monotonic() + timeout
  code = 0
  while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first running one)
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    late = deadline is not None and time.monotonic() > deadline
    if failed or late:
      code = failed[0] if failed else 124
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.05)
  for p in procs:
    p.wait()
  for t in threads:
    t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
  return code


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  ap = argparse.ArgumentParser(prog="python -m fedjax_tl.launch", description=__doc__.splitlines()[0],
                               allow_abbrev=False)
  ap.add_argument("--processes", type=int, default=2, help="local processes to start (default: 2)")
  ap.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped (exit 124)")
  args = ap.parse_args(own)
  if args.processes < 1:
    ap.error(f"--processes must be >= 1, got {args.processes}.")
  if not command:
    ap.error("give the command to run after --, e.g. python -m fedjax_tl.launch --processes=2 -- python run.py")
  raise SystemExit(launch(command, args.processes, args.timeout))


if __name__ == "__main__":
  main()
