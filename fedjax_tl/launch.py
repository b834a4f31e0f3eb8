"""Starts N local processes that join one JAX multi-controller run (fedjax_tl.distributed.initialize()).

    python -m fedjax_tl.launch --processes=2 -- python my_run.py --flag=value

Each process gets the coordinator address (a free port on 127.0.0.1), the number of processes and its id in
fedjax_tl.distributed.ENV; its output lines are prefixed with ``[i]``. If one process fails (a non-zero exit, or
killed by a signal), the launcher says which one and how, and stops the others at once; the exit code is the first
failure's (128 + the signal's number for a signal, 124 for ``--timeout``; 0 when all succeed).
``--heartbeat-timeout=S`` sets how long JAX's coordination service waits for a silent process before it fails
the run (fedjax_tl.distributed.initialize). For a TPU pod slice or a SLURM cluster use the platform's own
launcher instead (see fedjax_tl.distributed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from fedjax_tl.distributed import ENV, HEARTBEAT_ENV


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], processes: int, timeout: float | None = None, env: dict | None = None,
           out=sys.stdout, heartbeat_timeout: int | None = None) -> int:
  """Runs ``command`` as ``processes`` processes of one run; returns the exit code (see the module docstring).
  ``heartbeat_timeout``: seconds after which JAX's coordination service ends the run when a process stops sending
  heartbeats (fedjax_tl.distributed.initialize; default JAX's 100)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}.")
  if not command:
    raise ValueError("Give the command to run after --, e.g. python -m fedjax_tl.launch --processes=2 -- python "
                     "run.py")
  address = f"127.0.0.1:{free_port()}"
  procs, lock = [], threading.Lock()
  for i in range(processes):
    penv = {**os.environ, **(env or {}), ENV[0]: address, ENV[1]: str(processes), ENV[2]: str(i)}
    if heartbeat_timeout is not None:
      penv[HEARTBEAT_ENV] = str(int(heartbeat_timeout))
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
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
    late = deadline is not None and time.monotonic() > deadline
    if failed or late:
      running = [i for i, p in enumerate(procs) if p.poll() is None]
      if failed:
        i, rc = failed[0]
        code = _exit_code(rc)
        why = f"exited with code {rc}" if rc > 0 else f"was killed by {_signal_name(-rc)}"
        message = f"process {i} of {processes} {why}"
      else:
        code, message = 124, f"the {timeout:g} s timeout passed"
      with lock:
        out.write(f"fedjax_tl.launch: {message}; stopping processes {running} (exit code {code}).\n")
        out.flush()
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
    code = next((_exit_code(p.returncode) for p in procs if p.returncode != 0), 0)
  return code


def _exit_code(returncode: int) -> int:
  """A child's exit status as a shell reports it: its code, or 128 + the signal that killed it."""
  return returncode if returncode >= 0 else 128 - returncode


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  ap = argparse.ArgumentParser(prog="python -m fedjax_tl.launch", description=__doc__.splitlines()[0],
                               allow_abbrev=False)
  ap.add_argument("--processes", type=int, default=2, help="local processes to start (default: 2)")
  ap.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped (exit 124)")
  ap.add_argument("--heartbeat-timeout", type=int, default=None,
                  help="seconds without heartbeats before JAX declares a process dead (default: JAX's 100)")
  args = ap.parse_args(own)
  if args.processes < 1:
    ap.error(f"--processes must be >= 1, got {args.processes}.")
  if not command:
    ap.error("give the command to run after --, e.g. python -m fedjax_tl.launch --processes=2 -- python run.py")
  raise SystemExit(launch(command, args.processes, args.timeout, heartbeat_timeout=args.heartbeat_timeout))


if __name__ == "__main__":
  main()
