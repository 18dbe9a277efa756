"""Peak memory and step time of a deep ResNet's training step with and without remat.

    python tools/remat_table.py                      # pre-activation ResNet-1001, batch 8, CPU

Each policy (``config.model.remat``) runs in its own process: build the row's model (ResNet-v2
Table 3's ``cifar10_1001_preact`` at scale=paper unless --row says otherwise), compile one SGD
step (loss, gradients, update; the state donated) on a random batch of 32x32x3 images, time
--steps steps after one warm-up step. Memory is XLA's own account of the compiled step (temporary
buffers; temporaries plus arguments) and the process's peak resident set; step time is the median
wall time, also as a ratio to remat=none measured in the same invocation, and the median CPU time
of the process's threads (less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLE3 = REPO / "experiments" / "resnetv2_table3.py"


def row_config(row: str):
  from resjax import configs
  spec = importlib.util.spec_from_file_location("resnetv2_table3", TABLE3)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("scale=paper")
  (run,) = [r for r in config.runs if r.name == row]
  return configs.run_config(config, run)


def measure(row: str, remat: str, batch: int, steps: int) -> dict:
  """One policy, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from resjax import models, train

  rc = row_config(row)
  rc.model.remat = remat
  model = nnx.jit(lambda: models.build(rc.model, num_classes=10, in_channels=3,
                                       rngs=nnx.Rngs(params=train.key(0))))()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del model
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)

  def step(params, rest, x, labels):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x, train=True), labels).mean()
      return loss, nnx.state(m, nnx.Not(nnx.Param))  # BatchNorm statistics

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, rest, loss

  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, rest, x, labels).compile()
  compile_s = time.perf_counter() - t
  memory = compiled.memory_analysis()
  params, rest, loss = compiled(params, rest, x, labels)
  jax.block_until_ready(loss)
  times, cpu_times = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    params, rest, loss = compiled(params, rest, x, labels)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  return {"remat": remat, "depth": rc.model.depth, "batch": batch,
          "params": train.count_params(nnx.merge(graphdef, params, rest)),
          "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "compile_s": compile_s, "step_s": statistics.median(times),
          "cpu_step_s": statistics.median(cpu_times), "steps": steps,
          "loss": float(loss), "backend": jax.default_backend()}


def table(results: list[dict]) -> str:
  base = results[0]
  mib = lambda b: f"{b / 2**20:,.0f}"
  lines = ["| remat | XLA temp MiB | temp + args MiB | max RSS MiB | compile s | step s | "
           "step / none | CPU s / step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['remat']} | {mib(r['temp_bytes'])} | "
                 f"{mib(r['temp_bytes'] + r['argument_bytes'])} | {mib(r['max_rss_bytes'])} | "
                 f"{r['compile_s']:.1f} | {r['step_s']:.2f} | "
                 f"{r['step_s'] / base['step_s']:.2f} | {r['cpu_step_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--row", default="cifar10_1001_preact", help="a row of resnetv2_table3.py")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  p.add_argument("--policies", default="none,full,dots_saveable",
                 help="config.model.remat values, none first (the ratio's base)")
  p.add_argument("--json", help="also write the measurements here")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.row, args.child, args.batch, args.steps)))
    return 0
  from resjax.models import layers
  policies = args.policies.split(",")
  unknown = [x for x in policies if x not in layers.REMATS]
  if unknown or policies[0] != "none":
    print(f"--policies={args.policies}: give remat values from "
          f"{', '.join(layers.REMATS)}, none first", file=sys.stderr)
    return 2
  results = []
  for policy in policies:  # one process each: its own peak RSS
    out = subprocess.run([sys.executable, __file__, "--child", policy, "--row", args.row,
                          "--batch", str(args.batch), "--steps", str(args.steps)],
                         capture_output=True, text=True, check=True)
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {policy}: {results[-1]}", file=sys.stderr)
  r = results[0]
  print(f"{args.row}: ResNet-{r['depth']} ({r['params']:,} parameters), batch {r['batch']} of "
        f"32x32x3, backend {r['backend']}, median of {r['steps']} steps\n")
  print(table(results))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
