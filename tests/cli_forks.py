"""Runs many `python -m resjax.main` command lines in one process: JAX, Flax and orbax are imported
once, then each command line runs in a fork of this process (fresh absl flags, its own environment,
its own stdout and stderr at the file-descriptor level, its own exit status), which is what a new
process would run, without the seconds of imports each. Nothing here initialises a JAX backend, so
each fork starts its own (XLA_FLAGS in a case's environment still take effect).

    python tests/cli_forks.py < cases.json > results.json

cases.json: [{"args": [...], "env": {...}}, ...];
results.json: [{"returncode": ..., "stdout": ..., "stderr": ...}, ...].
"""

import json
import os
import sys
import tempfile
import traceback

import flax.nnx  # noqa: F401  the imports a command line pays for, paid once here
import jax  # noqa: F401
import optax  # noqa: F401
import orbax.checkpoint  # noqa: F401

from resjax import configs, inspect_model, main, malloc, sharding, train  # noqa: F401

WORKERS = 2
# A fork cannot start again under glibc's settings (resjax.malloc.reexec), so each runs as if it had.
os.environ.setdefault(malloc.ENV, malloc.TUNABLES)


def _child(case, out_path, err_path):
  os.environ.update(case["env"])
  for fd, path in ((1, out_path), (2, err_path)):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
  sys.argv = ["resjax.main", *case["args"]]
  code = 1
  try:
    main.run()
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # printed as a new process would print it
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_all(cases):
  tmp = tempfile.mkdtemp(prefix="cli_forks_")
  paths = [(os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err"))
           for i in range(len(cases))]
  results, running, todo = [None] * len(cases), {}, list(range(len(cases)))
  while todo or running:
    while todo and len(running) < WORKERS:
      i = todo.pop(0)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(cases[i], *paths[i])
      running[pid] = i
    pid, status = os.wait()
    i = running.pop(pid)
    out, err = (open(p, errors="replace").read() for p in paths[i])
    results[i] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err}
  return results


if __name__ == "__main__":
  json.dump(run_all(json.load(sys.stdin)), sys.stdout)
